"""Samples from a run's checkpoint: image files or an npz, a sample grid, latent interpolations.

Usage::

    python -m experiments.generate --workdir=RUN [--checkpoint=latest|best|STEP]
        [--generator=ema|raw] [--bn_mode=train|eval] [--seed=0]
        [--num_samples=N --output=DIR_OR_FILE.npz] [--grid=FILE.png]
        [--interpolations=K --steps=8 --interpolation_grid=FILE.png]

``--output=DIR`` writes ``sample_000000.png``...; ``--output=FILE.npz`` one uint8 array
``images`` (N, H, W, 3) (plus ``labels`` for a class-conditional model). ``--grid`` saves the
first 64 samples as one picture; a class-conditional model gets one row per class instead.
``--interpolations`` draws K pairs of noise vectors (same class for a conditional model) and
the images along the straight line between them, one row of ``--steps`` per pair. Sample ``i``
depends only on ``--seed`` and ``i`` (the same as ``experiments.evaluate`` draws), so the files
can be scored again later. Defaults: the latest checkpoint, the EMA generator, the run's
``eval.bn_mode``.
"""

from __future__ import annotations

import io
import math
import sys
from typing import Any

import numpy as np
from absl import app, flags

from ddst_jax import storage

FLAGS = flags.FLAGS


def _define_flags() -> None:
    # Defined only when run as a script, so importing this module (tests) adds no flags.
    flags.DEFINE_string("workdir", None, "Run directory.")
    flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' or a step.")
    flags.DEFINE_enum("generator", "ema", ["ema", "raw"], "Which G to sample.")
    flags.DEFINE_enum("bn_mode", None, ["train", "eval"],
                      "G's BatchNorm (default: the run's eval.bn_mode).")
    flags.DEFINE_integer("seed", 0, "Seed of the samples.")
    flags.DEFINE_integer("num_samples", 0, "Samples to write to --output.")
    flags.DEFINE_string("output", None, "A folder (PNG files) or a .npz file.")
    flags.DEFINE_string("grid", None, "PNG of a sample grid.")
    flags.DEFINE_integer("interpolations", 0, "Rows of latent interpolations.")
    flags.DEFINE_integer("steps", 8, "Images per interpolation row.")
    flags.DEFINE_string("interpolation_grid", None,
                        "PNG of the interpolations (default RUN/generate/).")
    flags.DEFINE_bool("verbose", False, "Full tracebacks and library logs.")


def generate(workdir: str, *, checkpoint: str = "latest", generator: str = "ema",
             bn_mode: str | None = None, seed: int = 0, num_samples: int = 0,
             output: str | None = None, grid: str | None = None, interpolations: int = 0,
             steps: int = 8, interpolation_grid: str | None = None) -> dict[str, Any]:
    """Writes what was asked for; returns ``{"written": [paths], "step": ...}``."""
    import jax  # noqa: PLC0415 (after flag parsing)
    import jax.numpy as jnp  # noqa: PLC0415

    from ddst_jax import reporting, scoring  # noqa: PLC0415
    from ddst_jax.gan import steps as steps_lib  # noqa: PLC0415

    if not (num_samples or grid or interpolations):
        raise ValueError("Nothing to generate: pass --num_samples with --output, --grid, or "
                         "--interpolations.")
    if num_samples and not output:
        raise ValueError("--num_samples needs --output=DIR or --output=FILE.npz.")
    run = scoring.load_run(workdir, checkpoint)
    bn_mode = bn_mode or run.config.eval.get("bn_mode", "train")
    batch = int(run.config.eval.batch_size)
    classes = run.setup.model.num_classes
    written: list[str] = []

    def samples(n: int) -> np.ndarray:
        out = [np.asarray(jax.device_get(scoring.sample_uint8(
            run, start, batch, seed=seed, generator=generator, bn_mode=bn_mode)))
            for start in range(0, n, batch)]
        return np.concatenate(out)[:n]

    if num_samples:
        images = samples(num_samples)
        if output.endswith(".npz"):
            arrays = {"images": images, **({"labels": _labels(num_samples, seed, classes)}
                                           if classes else {})}
            storage.atomic_write(output, lambda f: np.savez(f, **arrays))
            written.append(output)
        else:
            from PIL import Image  # noqa: PLC0415

            storage.makedirs(output)
            for i, image in enumerate(images):
                png = io.BytesIO()
                Image.fromarray(image).save(png, format="PNG")
                # Plain writes (no temporary file + fsync per image): a re-run rewrites them all.
                storage.put(storage.join(output, f"sample_{i:06d}.png"), png.getvalue())
            written.append(output)
    params = run.state.g_ema if generator == "ema" else run.state.g_params
    train_bn = bn_mode == "train"

    def render(z: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        images = steps_lib.generate(run.setup, params, run.state.g_state, run.state.g_masks,
                                    jnp.asarray(z), None if y is None else jnp.asarray(y),
                                    train=train_bn)
        return np.asarray(jax.device_get(images))

    rng = np.random.default_rng(seed)
    z_dim = run.setup.model.z_dim
    if grid:
        if classes:  # one row per class (at most 10 shown), 8 samples each
            rows = min(classes, 10)
            y = np.repeat(np.arange(rows, dtype=np.int32), 8)
            picture, ncol = render(rng.standard_normal((len(y), z_dim), np.float32), y), 8
        else:
            n = min(64, max(num_samples, 64))
            picture = samples(n) if not num_samples else images[:64]
            ncol = int(math.ceil(math.sqrt(len(picture))))
        reporting.save_image_grid(picture, grid, nrow=ncol)
        written.append(grid)
    if interpolations:
        a = rng.standard_normal((interpolations, z_dim), np.float32)
        b = rng.standard_normal((interpolations, z_dim), np.float32)
        t = np.linspace(0.0, 1.0, steps, dtype=np.float32)[None, :, None]
        z = ((1.0 - t) * a[:, None] + t * b[:, None]).reshape(-1, z_dim)
        y = (np.repeat(rng.integers(0, classes, interpolations).astype(np.int32), steps)
             if classes else None)
        path = interpolation_grid or storage.join(workdir, "generate",
                                                  f"interpolations_{run.which}.png")
        reporting.save_image_grid(render(z, y), path, nrow=steps)
        written.append(path)
    return {"written": written, "step": run.step, "checkpoint": run.which}


def _labels(n: int, seed: int, classes: int) -> np.ndarray:
    """The labels ``scoring.sample_uint8`` drew for samples 0..n-1."""
    import jax  # noqa: PLC0415

    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(np.arange(n))
    return np.asarray(jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 1), (), 0,
                                                            classes))(keys), np.int32)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from experiments import runner  # noqa: PLC0415

    if not FLAGS.verbose:
        runner.quiet_libraries()
    try:
        result = generate(FLAGS.workdir, checkpoint=FLAGS.checkpoint, generator=FLAGS.generator,
                          bn_mode=FLAGS.bn_mode, seed=FLAGS.seed,
                          num_samples=FLAGS.num_samples, output=FLAGS.output,
                          grid=FLAGS.grid, interpolations=FLAGS.interpolations,
                          steps=FLAGS.steps, interpolation_grid=FLAGS.interpolation_grid)
    except Exception as e:  # noqa: BLE001
        message = runner.user_error(e, storage.resolve(FLAGS.workdir or "."))
        if message is None or FLAGS.verbose:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
    for path in result["written"]:
        print(f"wrote {path}")


if __name__ == "__main__":
    _define_flags()
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
