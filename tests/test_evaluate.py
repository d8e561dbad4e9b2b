"""Scoring with a protocol: ``experiments.evaluate`` and ``experiments.generate`` on a smoke run,
with a random-valued Inception checkpoint in pytorch-fid's format (no real weights needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from test_inception import as_torch_state, random_inception_state_dict, write_zip
from test_train import tiny_config

from ddst_jax import scoring, train
from ddst_jax.metrics import fid, inception
from experiments import evaluate, generate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 8  # one Inception batch shape for every test: one compile
SMALL = {"num_samples": 8, "batch_size": BATCH, "kid_subsets": 4, "kid_subset_size": 8,
         "prdc_k": 3}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / inception.FID_WEIGHTS_FILE
    write_zip(path, as_torch_state(random_inception_state_dict()))
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    config = tiny_config(**{"data.synthetic_size": 16, "eval.batch_size": BATCH})
    assert train.train_and_evaluate(config, str(workdir))["finished"]
    return str(workdir)


@pytest.fixture(scope="module")
def first(run, weights):
    return evaluate.evaluate(run, inception_weights=weights, **SMALL)


def test_a_run_is_scored_with_every_metric_and_its_protocol(run, weights, first):
    scores, protocol = first["scores"], first["protocol"]
    for name in ("fid", "inception_score", "kid", "kid_std", "precision", "recall", "density",
                 "coverage"):
        assert np.isfinite(scores[name]), name
    assert 0.0 <= scores["precision"] <= 1.0 and 0.0 <= scores["coverage"] <= 1.0
    assert protocol["num_samples"] == 8 and protocol["seed"] == 0
    assert (protocol["generator"], protocol["bn_mode"], protocol["checkpoint"]) == (
        "ema", "train", "latest")
    assert protocol["step"] == 8 and protocol["resize"] == "pytorch"
    assert protocol["inception_sha256"] == scoring.file_sha256(weights)
    reference = protocol["reference"]
    assert reference["sha256"] == scoring.file_sha256(reference["file"])
    assert reference["protocol"]["images"] == 16  # every training image of the run
    assert protocol["ddst_jax"] and "commit" in protocol
    with open(first["output"], encoding="utf-8") as f:
        assert json.load(f)["protocol"]["inception_sha256"] == protocol["inception_sha256"]
    assert os.path.basename(first["output"]) == "latest_ema_pytorch.json"


def test_scores_are_deterministic_and_the_reference_is_cached(run, weights, first):
    mtime = os.path.getmtime(first["protocol"]["reference"]["file"])
    again = evaluate.evaluate(run, inception_weights=weights, **SMALL)
    assert again["scores"] == first["scores"]
    assert os.path.getmtime(first["protocol"]["reference"]["file"]) == mtime


def test_a_reference_of_another_protocol_is_refused(run, weights, first):
    with pytest.raises(scoring.ProtocolMismatch, match=r"resize: 'pytorch' \(reference\) vs "
                       r"'tf1' \(now\)"):
        evaluate.evaluate(run, inception_weights=weights, resize="tf1",
                          reference=first["protocol"]["reference"]["file"], **SMALL)


def test_a_ttur_reference_gives_fid_with_a_note(run, weights, first, tmp_path):
    ref = scoring.load_reference(first["protocol"]["reference"]["file"])
    path = tmp_path / "ttur.npz"
    np.savez(path, mu=ref.mu, sigma=ref.sigma)
    result = evaluate.evaluate(run, inception_weights=weights, reference=str(path),
                               output=str(tmp_path / "out.json"), **SMALL)
    assert result["scores"]["fid"] == pytest.approx(first["scores"]["fid"], rel=1e-6)
    assert result["scores"]["kid"] is None and result["scores"]["precision"] is None
    assert "records no protocol" in result["notes"][0]


def test_fid_of_images_against_their_own_statistics_is_zero(weights, tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    path = tmp_path / "images.npz"
    np.savez(path, images=images)
    variables = inception.load_weights(weights)
    pool, _ = inception.features_batched(variables, images, batch_size=BATCH)
    mu, sigma = fid.feature_statistics(pool)
    protocol = {"resize": "pytorch", "inception_sha256": scoring.file_sha256(weights),
                "image_size": 32}
    scoring.save_reference(tmp_path / "ref.npz", mu, sigma, pool, protocol)
    result = evaluate.evaluate(images=str(path), reference=str(tmp_path / "ref.npz"),
                               inception_weights=weights, batch_size=BATCH, kid_subsets=3,
                               kid_subset_size=12, prdc_k=3)
    scores = result["scores"]
    assert abs(scores["fid"]) < 1e-3
    assert scores["precision"] == scores["recall"] == scores["coverage"] == 1.0
    assert scores["density"] == pytest.approx(1.0)
    assert result["protocol"]["images_sha256"] == scoring.file_sha256(path)


def test_generate_writes_pngs_npz_grids_and_interpolations(run, tmp_path):
    out = generate.generate(run, num_samples=5, output=str(tmp_path / "pngs"),
                            grid=str(tmp_path / "grid.png"), interpolations=2, steps=4,
                            interpolation_grid=str(tmp_path / "interp.png"))
    assert out["step"] == 8
    names = sorted(os.listdir(tmp_path / "pngs"))
    assert names == [f"sample_{i:06d}.png" for i in range(5)]
    generate.generate(run, num_samples=5, output=str(tmp_path / "s.npz"))
    with np.load(tmp_path / "s.npz") as f:
        images = f["images"]
    assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8
    # The PNGs hold the same pixels, and sample i is the one the evaluation draws.
    assert np.array_equal(np.asarray(Image.open(tmp_path / "pngs" / names[3])), images[3])
    loaded = scoring.load_run(run)
    drawn = np.asarray(scoring.sample_uint8(loaded, 0, BATCH, seed=0))
    assert np.array_equal(drawn[:5], images)
    with Image.open(tmp_path / "interp.png") as picture:  # 2 rows of 4 images of 32 px
        assert picture.size[1] < picture.size[0] and picture.size[0] >= 4 * 32
    assert os.path.getsize(tmp_path / "grid.png") > 0


def test_tf1_resize_is_tensorflow_1s_bilinear():
    # TF 1 samples input coordinate i * in / out with no half-pixel offset: 2 -> 4 pixels reads
    # coordinates 0, 0.5, 1, 1.5 (the last clamped to the right edge).
    x = jnp.asarray([[0.0, 1.0]]).reshape(1, 1, 2, 1) * jnp.ones((1, 2, 2, 1))
    out = np.asarray(inception._resize_tf1(x, 4))
    np.testing.assert_allclose(out[0, 0, :, 0], [0.0, 0.5, 1.0, 1.0])
    images = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    a = np.asarray(inception.preprocess(jnp.asarray(images), "tf1"))
    b = np.asarray(inception.preprocess(jnp.asarray(images), "pytorch"))
    assert a.shape == b.shape == (2, 299, 299, 3) and not np.allclose(a, b, atol=1e-3)
    np.testing.assert_allclose(a[:, 0, 0], images[:, 0, 0] / 127.5 - 1, atol=1e-6)  # corner


def test_cli_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.evaluate",
                           f"--workdir={tmp_path / 'none'}"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "holds no run" in proc.stderr
