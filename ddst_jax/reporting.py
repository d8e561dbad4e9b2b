"""Observability for training runs: scalars, images, progress, sample grids, curves, summaries.

`MetricWriter` and `progress_bar` act only on process 0 (elsewhere they are silent no-ops).
The file helpers (`save_image_grid`, `plot_curves`, `write_summary`) write wherever they are
called: call them under `if is_primary():`.

Every scalar row also goes to `workdir/metrics.jsonl`, one JSON object per line
(`{"step": 1000, "br/ratio": 0.48, ...}`, non-finite values as `null`), so curves and reports
can be made without TensorBoard.

Every file goes through `ddst_jax.storage` (etils.epath), so `workdir` may be a bucket URI
(`gs://...`); the guarantees there (one object upload per file, appends re-uploaded) are in
that module's docstring.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import tqdm
from absl import logging

from ddst_jax import storage

JSONL_NAME = "metrics.jsonl"


def is_primary() -> bool:
    """Whether this is process 0, the one that writes logs and reports."""
    return jax.process_index() == 0


def say(message: str) -> None:
    """A message for the person running the job, on process 0: printed to stderr above any
    progress bar (whatever the log verbosity), and logged."""
    logging.info("%s", message)
    if is_primary():
        tqdm.tqdm.write(message, file=sys.stderr)


# Files.


# A crash leaves either the old file or the new one, never a partial file (local or bucket).
_atomic_write = storage.atomic_write


def to_jsonable(value: Any, _path: str = "") -> Any:
    """Converts numpy/JAX scalars and arrays, tuples and ConfigDicts to plain JSON values.

    Non-finite floats become None (strict JSON has no NaN).
    """
    if hasattr(value, "to_dict") and callable(value.to_dict):  # ml_collections.ConfigDict
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v, f"{_path}/{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v, f"{_path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.ndarray | np.generic | jax.Array):
        return to_jsonable(np.asarray(value).tolist(), _path)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    raise TypeError(f"Cannot write {type(value).__name__} at '{_path or '/'}' as JSON; convert it "
                    "to a number, string, list or dict first.")


def write_summary(path: str | os.PathLike, summary: Mapping[str, Any]) -> str:
    """Writes `summary` as indented JSON, atomically (a reader never sees a partial file).

    Returns:
        The path written.
    """
    text = json.dumps(to_jsonable(summary), indent=2, sort_keys=True, allow_nan=False) + "\n"
    return _atomic_write(path, lambda f: f.write(text), mode="w")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads the rows of a metrics JSONL file.

    A malformed last line (a write cut short by a crash) is skipped; a malformed line elsewhere
    is real damage and raises ValueError.
    """
    lines = storage.read_text(path).split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if not any(rest.strip() for rest in lines[number:]):
                logging.warning("Skipping a half-written last line in %s.", path)
                continue
            raise ValueError(f"{path}:{number} is not a JSON object row ({e}); fix or delete "
                             "that line.") from e
        rows.append(row)
    return rows


def truncate_jsonl(path: str, resume_step: int | None) -> None:
    """Drops rows after `resume_step` and any half-written last line, atomically."""
    if not storage.exists(path):
        return
    data = storage.read_bytes(path)
    if resume_step is None and (not data or data.endswith(b"\n")):
        return  # nothing to drop; keep appending to the file as it is
    rows = read_jsonl(path)
    kept = [r for r in rows if resume_step is None or r.get("step", -1) <= resume_step]
    text = "".join(json.dumps(to_jsonable(r), allow_nan=False) + "\n" for r in kept)
    _atomic_write(path, lambda f: f.write(text), mode="w")
    if len(kept) < len(rows):
        logging.info("Dropped %d rows after step %s from %s.", len(rows) - len(kept),
                     resume_step, path)


# Scalars and images.


def _scalar(name: str, value: Any) -> float:
    array = np.asarray(value)
    try:
        if array.size != 1:
            raise ValueError
        return float(array.reshape(()))
    except (TypeError, ValueError):
        raise ValueError(f"Scalar '{name}' must be a single number, got shape {array.shape} "
                         f"dtype {array.dtype}.") from None


def _check_images(name: str, images: Any) -> np.ndarray:
    array = np.asarray(images)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"Images '{name}' must be uint8 NHWC with 1, 3 or 4 channels, got "
                         f"{array.dtype}{list(array.shape)}; convert floats with to_uint8().")
    return array


class MetricWriter:
    """TensorBoard scalars/images plus a JSONL copy of every scalar, on process 0 only."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        resume_step: int | None = None,
        enabled: bool | None = None,
        tensorboard: bool = True,
        jsonl_name: str = JSONL_NAME,
    ):
        """Opens the writers (appending to earlier logs of the same run).

        Args:
            workdir: the run directory; events go to `workdir/tensorboard`, scalars also to
                `workdir/<jsonl_name>`.
            resume_step: the step a resumed run restarts from: JSONL rows with a larger step
                are dropped and TensorBoard hides its later events, so the logs match the
                resumed trajectory. None keeps everything (a fresh run); pass -1 to start a
                fresh run over old logs.
            enabled: write at all; defaults to `is_primary()`.
            tensorboard: also write TensorBoard event files.
            jsonl_name: file name of the JSONL copy.
        """
        self.enabled = is_primary() if enabled is None else enabled
        self.jsonl_path = storage.join(workdir, jsonl_name)
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        storage.makedirs(workdir)
        truncate_jsonl(self.jsonl_path, resume_step)
        # On a bucket, rows are uploaded every 30 s and on flush (the runner flushes before
        # each checkpoint), as TensorBoard's events are.
        self._jsonl = storage.Appender(self.jsonl_path, interval_s=30.0)
        if tensorboard:
            from tensorboardX import SummaryWriter

            logdir = storage.join(workdir, "tensorboard")
            storage.register_event_writer(logdir)
            purge = None if resume_step is None else max(resume_step + 1, 0)
            self._tb = SummaryWriter(logdir=logdir, purge_step=purge, flush_secs=30)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Logs scalars (numbers, 0-d or size-1 arrays) at `step`."""
        if not self.enabled or not scalars:
            return
        if "step" in scalars:
            raise ValueError("'step' is reserved for the row's step; rename that scalar.")
        values = {name: _scalar(name, v) for name, v in scalars.items()}
        finite = {k: (v if math.isfinite(v) else None) for k, v in values.items()}
        row = {"step": int(step), **finite}
        # One write per complete line: a crash can only cut the last line, which readers skip.
        self._jsonl.write(json.dumps(row, allow_nan=False) + "\n")
        if self._tb is not None:
            for name, v in values.items():
                self._tb.add_scalar(name, v, int(step))

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """Logs batches of uint8 NHWC images at `step` (TensorBoard tiles each batch)."""
        if not self.enabled:
            return
        checked = {name: _check_images(name, v) for name, v in images.items()}
        if self._tb is not None:
            for name, array in checked.items():
                self._tb.add_images(name, array, int(step), dataformats="NHWC")

    def flush(self) -> None:
        """Pushes buffered rows and events to disk (or uploads them to the bucket)."""
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flushes and closes the files (idempotent)."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def progress_bar(
    total: int,
    initial: int = 0,
    *,
    enabled: bool | None = None,
    desc: str = "train",
    **kwargs: Any,
) -> tqdm.tqdm:
    """A tqdm bar over iterations with it/s and ETA, starting at a resumed iteration.

    Args:
        total: the run's number of iterations.
        initial: the iteration the run (re)starts from.
        enabled: show it; defaults to `is_primary()`.
        desc: the bar's label.
        **kwargs: passed on to `tqdm.tqdm` (e.g. `file`, `mininterval`).
    """
    enabled = is_primary() if enabled is None else enabled
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm.tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="it",
                     **kwargs)


# Sample grids.


def to_uint8(images: Any) -> np.ndarray:
    """Images as uint8: floats are read as [-1, 1] (clipped), uint8 passes through."""
    array = np.asarray(images)
    if array.dtype == np.uint8:
        return array
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"Images must be floats in [-1, 1] or uint8, got {array.dtype}.")
    array = np.nan_to_num(array.astype(np.float32), nan=-1.0)
    return np.rint((np.clip(array, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def image_grid(images: Any, nrow: int = 8, padding: int = 2, pad_value: int = 0) -> np.ndarray:
    """Tiles (N, H, W, C) images into one uint8 (H', W', C) image, `nrow` images per row.

    The grid is `rows * (H + padding) + padding` high and `min(nrow, N) * (W + padding) +
    padding` wide, with `rows = ceil(N / nrow)` (the torchvision layout).
    """
    array = to_uint8(images)
    if array.ndim != 4 or array.shape[-1] not in (1, 3) or array.shape[0] == 0:
        raise ValueError(f"Expected a non-empty (N, H, W, 1 or 3) batch, got {list(array.shape)}.")
    if nrow < 1 or padding < 0:
        raise ValueError(f"nrow must be >= 1 and padding >= 0, got {nrow} and {padding}.")
    n, h, w, c = array.shape
    cols, rows = min(nrow, n), math.ceil(n / nrow)
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c),
                   pad_value, np.uint8)
    for i in range(n):
        top = padding + (i // cols) * (h + padding)
        left = padding + (i % cols) * (w + padding)
        grid[top:top + h, left:left + w] = array[i]
    return grid


def save_image_grid(
    images: Any, path: str | os.PathLike, nrow: int = 8, padding: int = 2
) -> str:
    """Saves (N, H, W, 3 or 1) images (floats in [-1, 1] or uint8) as one PNG grid.

    Returns:
        The path written.
    """
    from PIL import Image

    grid = image_grid(images, nrow=nrow, padding=padding)
    picture = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    return _atomic_write(path, lambda f: picture.save(f, format="PNG"))


# Curves.


def scalar_series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one scalar across JSONL rows; null values become NaN."""
    pairs = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
    steps = np.array([s for s, _ in pairs], dtype=np.int64)
    values = np.array([np.nan if v is None else v for _, v in pairs], dtype=np.float64)
    return steps, values


def _save_figure(figure: Any, path: str) -> str:
    return _atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=120))


def plot_curves(
    metrics_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    br_key: str = "br/ratio",
    br_windowed_key: str = "br/windowed",
    density_keys: Sequence[str] = ("density/g", "density/d"),
    br_band: tuple[float, float] | None = None,
) -> list[str]:
    """Plots BR (per measurement and windowed) and densities over iterations as PNGs.

    Args:
        metrics_path: a metrics JSONL file (see `MetricWriter`).
        out_dir: where `br.png` and `density.png` go.
        br_key: scalar of the per-measurement balance ratio.
        br_windowed_key: scalar of the windowed BR.
        density_keys: density scalars to draw together (fractions in [0, 1]).
        br_band: (B-, B+) drawn as dashed lines, e.g. (0.45, 0.55).

    Returns:
        The paths of the plots written (a plot with no data is skipped).
    """
    # The object API with no pyplot: no global backend switch, no figure registry to leak.
    from matplotlib.figure import Figure

    rows = read_jsonl(metrics_path)
    written = []

    def plot(name: str, series: Sequence[tuple[str, dict[str, Any]]], ylabel: str,
             extra: Callable[[Any], None] | None = None) -> None:
        drawn = [(key, style, scalar_series(rows, key)) for key, style in series]
        drawn = [(key, style, xy) for key, style, xy in drawn if np.isfinite(xy[1]).any()]
        if not drawn:
            say(f"No finite value of {', '.join(key for key, _ in series)} to plot: "
                f"{name} not written.")
            return
        figure = Figure(figsize=(7, 4), layout="constrained")
        ax = figure.add_subplot()
        for key, style, (steps, values) in drawn:
            ax.plot(steps, values, label=key, **style)
        if extra is not None:
            extra(ax)
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        written.append(_save_figure(figure, storage.join(out_dir, name)))

    def band(ax: Any) -> None:
        if br_band is not None:
            for level in br_band:
                ax.axhline(level, color="gray", linestyle="--", linewidth=1)

    plot("br.png", [(br_key, {"alpha": 0.35, "linewidth": 0.8, "marker": ".", "markersize": 2}),
                    (br_windowed_key, {"linewidth": 2})], "balance ratio", band)
    plot("density.png", [(key, {"linewidth": 1.5}) for key in density_keys], "density")
    if not written:
        available = sorted({k for r in rows for k in r} - {"step"})
        raise ValueError(f"{metrics_path} has no finite values for {br_key}, {br_windowed_key} "
                         f"or {list(density_keys)}; available scalars: {available}.")
    return written
