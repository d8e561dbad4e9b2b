"""CIFAR-10 SNGAN (docs/method.md section 7) with the paper's settings; ADAPT relaxed, d_G 0.1.

Usage:
  python -m experiments.cifar10 --config=experiments/configs/cifar10.py --workdir=DIR
  python -m experiments.cifar10 --config=experiments/configs/cifar10.py:smoke --workdir=DIR
  ... --config.sparsity.method=sdst --config.sparsity.d_mode=strong --config.train.iterations=1000

Presets (the part after ':'): none (full paper run), "smoke" (tiny widths, a few iterations,
small intervals so that G mask updates and D density decisions happen; < 2 min on a 2-core CPU).
"""

import ml_collections
from ml_collections import config_dict

from ddst_jax import data


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """Returns the run configuration; ``preset`` selects a named variant."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # Seeds params, masks, noise and data order; same seed -> same trajectory.
    # "fixed": train as the paper's code does, with its defects fixed (docs/reference.md).
    # "exact": the paper's code exactly: train-mode BR forwards, Bernoulli masks, a 101-ratio
    # decision window with non-finite ratios kept (balance.eps ignored), float-density control.
    c.reference_mode = "fixed"

    c.model = ml_collections.ConfigDict()
    c.model.name = "sngan32"  # Architecture: "sngan32" (CIFAR-10) or "sngan48" (STL-10).
    c.model.z_dim = 128  # Noise dimension.
    c.model.g_ch = 256  # G width (sngan32: every block).
    c.model.d_ch = 128  # D width (sngan32: every block).
    # "reference": the init the authors' code uses for this model (sngan32: PyTorch's default,
    # nonzero biases; sngan48: He normal); or a scheme name ("torch", "kaiming", "xavier").
    c.model.init_scheme = "reference"
    # Classes of a conditional model (BigGAN); None: the architecture's default.
    c.model.num_classes = config_dict.placeholder(int)
    # "float32" or "bfloat16": activations/convolutions; params, optimizer state, masks, BN/SN
    # statistics and losses stay float32.
    c.model.compute_dtype = "float32"

    c.data = data.default_config()  # Input pipeline; see ddst_jax.data.default_config.

    c.train = ml_collections.ConfigDict()
    c.train.iterations = 100_000  # Iterations (n_dis D steps + 1 G step each).
    c.train.n_dis = 5  # D steps per iteration.
    c.train.batch_size_g = 128  # G step batch (global, all devices).
    c.train.batch_size_d = 64  # D step batch of real and of fake images (global).
    c.train.lr_g = 2e-4  # Adam learning rate of G.
    c.train.lr_d = 2e-4  # Adam learning rate of D.
    c.train.beta1 = 0.0  # Adam beta1.
    c.train.beta2 = 0.9  # Adam beta2.
    c.train.ema_decay = 0.999  # Decay of G's sparse parameter EMA.
    c.train.log_every = 100  # Iterations between scalar logs (and non-finite checks).
    c.train.checkpoint_every = 5000  # Iterations between checkpoints (also at the end / signal).
    c.train.sample_every = 5000  # Iterations between EMA sample grids (also at the end).
    c.train.num_samples = 64  # Images in a sample grid.
    c.train.sample_bn_mode = "train"  # G's BN when sampling: "train" (paper) or "eval".
    c.train.max_to_keep = 3  # Periodic checkpoints kept.
    c.train.progress_bar = True  # tqdm bar with it/s and ETA on process 0.
    c.train.unroll_d_steps = True  # Unroll the n_dis D-step scan (21x faster on XLA:CPU).
    # D step: "separate" D(real) and D(fake) forwards (paper's code: two spectral-norm power
    # iterations) or "concat" (one forward over both batches).
    c.train.d_forward = "separate"

    c.sparsity = ml_collections.ConfigDict()
    c.sparsity.method = "adapt"  # "dense", "static", "sdst", "adapt" (ADAPT/DDST) or "dda".
    c.sparsity.setting = "relaxed"  # "relaxed" (D cap 1.0) or "strict" (D cap d_max).
    c.sparsity.d_mode = "balance"  # static/sdst: "balance" (d_D = d_G) or "strong" (d_D = cap).
    c.sparsity.d_density = config_dict.placeholder(float)  # static/sdst: explicit d_D.
    c.sparsity.g_density = 0.1  # d_G, fraction of G's maskable weights that are active.
    c.sparsity.distribution = "erk"  # Layer-wise densities: "erk" or "uniform".
    c.sparsity.erk_power = 1.0  # Exponent of ERK's raw scores.
    c.sparsity.scope = "global"  # Drop-and-grow ranking: "global" (paper) or "layer".
    c.sparsity.regrow = "rigl"  # Grow criterion: "rigl" (largest |grad|) or "set" (random).
    c.sparsity.g_update_every = 500  # dT_G: iterations between G mask updates.
    c.sparsity.drop_fraction = 0.5  # f_0 of the cosine drop-fraction schedule.
    c.sparsity.drop_fraction_final = 0.005  # f_min of the cosine schedule.
    c.sparsity.optimizer_policy = "paper"  # "paper" (dense grads, moments kept) or "rigl".

    c.balance = ml_collections.ConfigDict()
    c.balance.br_every = 10  # Iterations between BR measurements.
    c.balance.window = 1000  # BR window in iterations (window // br_every entries).
    c.balance.eps = 1e-8  # |c - b| below this makes a measurement non-finite (ignored).

    c.control = ml_collections.ConfigDict()
    # D-density controller by registry name (ddst_jax.control.CONTROLLERS, e.g. "proportional");
    # "": the method's own ("relaxed", "strict", "dda"; "static" for dense/static/sdst).
    c.control.controller = ""
    # dT_D in iterations; None: the method's default (1000 relaxed, 2000 strict and DDA).
    c.control.d_update_every = config_dict.placeholder(int)
    c.control.band_low = config_dict.placeholder(float)  # B-; None: 0.45 (DDA 0.50).
    c.control.band_high = config_dict.placeholder(float)  # B+; None: 0.55 (DDA 0.65).
    c.control.delta = 0.05  # D density step.
    c.control.d_min = 0.05  # D density floor.
    c.control.d_max = 0.5  # D density cap of the strict setting.
    c.control.gain = 0.5  # "proportional": density change per unit of BR outside the band.
    c.control.max_step = 0.1  # "proportional": largest density change per decision.
    # "relative" (docs/method.md section 9): the band is (ratio_low, ratio_high) x BR_ref.
    c.control.ratio_low = 0.9  # "relative": B- = ratio_low x BR_ref.
    c.control.ratio_high = 1.1  # "relative": B+ = ratio_high x BR_ref.
    c.control.reference_br = 0.0  # "relative": fixed BR_ref if > 0 (1 with 0.45/0.55: paper).
    c.control.calibration_decisions = 1  # "relative": decisions whose mean BR is BR_ref.

    c.health = ml_collections.ConfigDict()
    # Stop a run whose loss/d and loss/g both stay unchanged this many iterations (0: off).
    c.health.pinned_iterations = 2000
    c.health.pinned_tolerance = 1e-5  # "Unchanged": within this times (1 + |loss|).
    c.health.nonfinite_br = True  # Stop when a full BR window holds no finite ratio.

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 5000  # Iterations between FID/IS evaluations (also at the end); 0: never.
    c.eval.num_samples = 50_000  # EMA-G samples per evaluation (the paper: 50k).
    c.eval.batch_size = 100  # Samples per generator / Inception batch (multiple of devices).
    c.eval.bn_mode = "train"  # G's BN when sampling: "train" (paper: batch stats) or "eval".
    c.eval.splits = 10  # Inception Score splits.
    # Path of pytorch-fid's pt_inception-2015-12-05-6726825d.pth; None: cache, else download.
    c.eval.inception_weights = config_dict.placeholder(str)
    # TTUR-format .npz (mu, sigma) of the real images; None: computed once from the data source.
    c.eval.reference_stats = config_dict.placeholder(str)

    c.parallel = ml_collections.ConfigDict()
    c.parallel.distributed = False  # Call jax.distributed.initialize() (multi-host runs).
    # Explicit cluster spec; None: auto-detected (TPU pods, SLURM, Kubernetes...).
    c.parallel.coordinator_address = config_dict.placeholder(str)
    # Number of JAX processes; None: auto-detected.
    c.parallel.num_processes = config_dict.placeholder(int)
    # This process's index; None: auto-detected.
    c.parallel.process_id = config_dict.placeholder(int)
    c.parallel.num_devices = 0  # Devices of the data-parallel mesh; 0: every device.

    return with_preset(c, preset, (16, 16))


def with_preset(c: ml_collections.ConfigDict, preset: str | None,
                smoke_widths: tuple[int, int]) -> ml_collections.ConfigDict:
    """Apply a named preset to a benchmark's full config; ``smoke_widths`` = (g_ch, d_ch)."""
    if preset in (None, ""):
        return c
    if preset == "smoke":
        c = _smoke(c)
        c.model.g_ch, c.model.d_ch = smoke_widths
        return c
    raise ValueError(f"Unknown preset {preset!r}; use none or 'smoke'.")


def _smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Tiny widths and intervals: every mechanism runs within a couple of minutes on a CPU."""
    c.model.g_ch = 16
    c.model.d_ch = 16
    c.data.source = "synthetic"
    c.data.synthetic_size = 256
    c.train.iterations = 40
    c.train.n_dis = 2
    c.train.batch_size_g = 16
    c.train.batch_size_d = 8
    c.train.log_every = 5
    c.train.checkpoint_every = 20
    c.train.sample_every = 20
    c.train.num_samples = 16
    c.eval.every = 0  # The FID Inception costs ~0.4 s per image on a 2-core CPU.
    c.eval.num_samples = 64
    c.eval.batch_size = 16
    c.sparsity.g_density = 0.3
    c.sparsity.g_update_every = 10
    c.balance.br_every = 2
    c.balance.window = 10
    c.control.d_update_every = 10
    return c
