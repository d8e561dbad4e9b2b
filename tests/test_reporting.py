"""Metric writer (TensorBoard + JSONL), progress bar, image grids, plots, summaries."""

import io
import json
import os
import struct

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from ddst_jax.reporting import (
    MetricWriter,
    image_grid,
    plot_curves,
    progress_bar,
    read_jsonl,
    save_image_grid,
    to_jsonable,
    to_uint8,
    write_summary,
)


def _events(logdir: str) -> list:
    """Decodes the TFRecord event files under `logdir` (no TensorFlow needed)."""
    events = []
    for name in sorted(os.listdir(logdir)):
        with open(os.path.join(logdir, name), "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            offset += 12  # length and its CRC
            events.append(event_pb2.Event.FromString(data[offset:offset + length]))
            offset += length + 4  # record and its CRC
    return events


def _scalars(events) -> dict:
    return {(v.tag, e.step): v.simple_value for e in events for v in e.summary.value
            if v.HasField("simple_value")}


def test_writer_writes_tensorboard_events_and_jsonl(tmp_path):
    images = np.zeros((4, 8, 8, 3), np.uint8)
    with MetricWriter(tmp_path, enabled=True) as writer:
        writer.write_scalars(10, {"br/ratio": 0.5, "density/d": jnp.float32(0.25)})
        writer.write_scalars(20, {"br/ratio": np.array([float("nan")]), "loss/g": 1})
        writer.write_images(20, {"samples": images})
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert rows == [{"step": 10, "br/ratio": 0.5, "density/d": 0.25},
                    {"step": 20, "br/ratio": None, "loss/g": 1.0}]
    events = _events(os.path.join(tmp_path, "tensorboard"))
    scalars = _scalars(events)
    assert scalars[("br/ratio", 10)] == 0.5 and scalars[("density/d", 10)] == 0.25
    assert np.isnan(scalars[("br/ratio", 20)])
    image_tags = {v.tag for e in events for v in e.summary.value if v.HasField("image")}
    assert image_tags == {"samples"}


def test_writer_rejects_bad_values(tmp_path):
    with MetricWriter(tmp_path, enabled=True, tensorboard=False) as writer:
        with pytest.raises(ValueError, match="'loss' must be a single number"):
            writer.write_scalars(1, {"loss": np.zeros(3)})
        with pytest.raises(ValueError, match="reserved"):
            writer.write_scalars(1, {"step": 1})
        with pytest.raises(ValueError, match="uint8 NHWC"):
            writer.write_images(1, {"x": np.zeros((2, 4, 4, 3), np.float32)})
    assert read_jsonl(tmp_path / "metrics.jsonl") == []


def test_disabled_writer_is_a_no_op(tmp_path):
    with MetricWriter(tmp_path / "run", enabled=False) as writer:
        writer.write_scalars(1, {"a": 1.0})
        writer.write_images(1, {"x": np.zeros((1, 2, 2, 3), np.uint8)})
    assert not os.path.exists(tmp_path / "run")


def test_resume_truncates_later_rows_and_hides_later_events(tmp_path):
    with MetricWriter(tmp_path, enabled=True) as writer:
        for step in range(1, 6):
            writer.write_scalars(step, {"a": float(step)})
    with MetricWriter(tmp_path, enabled=True, resume_step=3) as writer:
        assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
        writer.write_scalars(4, {"a": 40.0})
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["a"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    # TensorBoard is told to purge the abandoned steps from step 4 on.
    events = _events(os.path.join(tmp_path, "tensorboard"))
    assert any(e.HasField("session_log") and e.step == 4 for e in events)


def test_half_written_last_line_is_skipped_and_repaired(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0}\n{"step": 3, "a"')
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]
    with MetricWriter(tmp_path, enabled=True, tensorboard=False) as writer:
        writer.write_scalars(3, {"a": 3.0})
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]

    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_jsonl(path)


def test_progress_bar_starts_at_the_resumed_iteration():
    out = io.StringIO()
    with progress_bar(10, initial=4, enabled=True, file=out, mininterval=0) as bar:
        bar.update(2)
        assert bar.n == 6 and bar.total == 10
    text = out.getvalue()
    assert "6/10" in text and "it/s" in text
    assert progress_bar(10, enabled=False).disable


def test_image_grid_layout_and_png_size(tmp_path):
    images = np.linspace(-1, 1, 10 * 8 * 6 * 3).reshape(10, 8, 6, 3)
    grid = image_grid(images, nrow=4, padding=2)
    # 3 rows of 8 + 2 pixels and 4 columns of 6 + 2 pixels, plus the outer padding.
    assert grid.shape == (3 * (8 + 2) + 2, 4 * (6 + 2) + 2, 3) and grid.dtype == np.uint8
    np.testing.assert_array_equal(grid[2:10, 2:8], to_uint8(images[0]))
    path = save_image_grid(images, tmp_path / "sub" / "grid.png", nrow=4)
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.size == (34, 32)
    gray = save_image_grid(np.full((2, 5, 5, 1), 255, np.uint8), tmp_path / "g.png", nrow=8)
    with Image.open(gray) as picture:
        assert picture.size == (2 * (5 + 2) + 2, 5 + 2 + 2) and picture.getpixel((3, 3)) == 255
    np.testing.assert_array_equal(to_uint8(np.array([-1.0, 0.0, 1.0, 3.0])), [0, 128, 255, 255])
    with pytest.raises(ValueError, match="N, H, W"):
        image_grid(np.zeros((8, 8, 3), np.uint8))


def test_plot_curves_from_a_metrics_file(tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    rng = np.random.default_rng(0)
    with MetricWriter(tmp_path, enabled=True, tensorboard=False) as writer:
        for step in range(10, 1001, 10):
            writer.write_scalars(step, {"br/ratio": rng.uniform(0, 1), "density/g": 0.2})
            if step % 100 == 0:
                writer.write_scalars(step, {"br/windowed": 0.5, "density/d": 0.2 + step / 1e4})
    paths = plot_curves(metrics, tmp_path / "plots", br_band=(0.45, 0.55))
    assert [os.path.basename(p) for p in paths] == ["br.png", "density.png"]
    for path in paths:
        with Image.open(path) as picture:
            assert picture.format == "PNG" and min(picture.size) > 100
    # Custom keys; a plot without data is skipped, and no data at all is an error.
    only = plot_curves(metrics, tmp_path / "p2", br_key="x", br_windowed_key="y")
    assert [os.path.basename(p) for p in only] == ["density.png"]
    assert "No finite value of x, y to plot: br.png not written." in capsys.readouterr().err
    with pytest.raises(ValueError, match="available scalars"):
        plot_curves(metrics, tmp_path / "p3", br_key="x", br_windowed_key="y", density_keys=())


def test_write_summary_is_atomic_and_json_clean(tmp_path):
    path = tmp_path / "summary.json"
    config = ml_collections.ConfigDict({"density": 0.2, "band": (0.45, 0.55)})
    write_summary(path, {"fid": np.float32(12.5), "steps": np.int64(3), "config": config,
                         "br": jnp.array([0.5, jnp.nan])})
    assert json.loads(path.read_text()) == {
        "br": [0.5, None], "config": {"band": [0.45, 0.55], "density": 0.2},
        "fid": 12.5, "steps": 3}
    before = path.read_text()
    with pytest.raises(TypeError, match="/bad"):
        write_summary(path, {"bad": object()})
    assert path.read_text() == before  # a failed write leaves the old file
    assert os.listdir(tmp_path) == ["summary.json"]  # no temporary files left
    assert to_jsonable((1, {"x": float("inf")})) == [1, {"x": None}]
