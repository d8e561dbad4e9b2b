"""A 2-D balance benchmark: sparse MLP GANs on Gaussian mixtures, trained on a CPU.

The classic mode-collapse test (ring of 8 Gaussians, 5x5 grid of Gaussians) with the *same*
sparse-GAN iteration as the image runs: ``ddst_jax.gan.steps.train_iteration`` (n_dis D steps,
G step, side-effect-free BR triple and window, G drop-and-grow, ADAPT's D-density decisions, sparse
EMA) driven by ``ddst_jax.sparsity``, ``ddst_jax.balance`` and ``ddst_jax.control``. Only the data
(sampled inside the jitted loop), the MLPs and the mode metrics are specific to 2-D.

Typical use::

    config = ToyConfig()
    setup = build_setup(config, "adapt")
    state, curves = train(setup, config.dataset, jax.random.key(0))
    samples = generate_samples(setup, state, jax.random.key(1), 10_000)
    mode_metrics(samples, "ring")  # {'modes_covered': 8, 'high_quality': 0.9, ...}
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddst_jax import balance, control
from ddst_jax import sparsity as sp
from ddst_jax.gan import setup as setup_lib
from ddst_jax.gan import steps
from ddst_jax.gan.methods import MethodSpec, resolve_method

DATASETS = ("ring", "grid")
#: The compared methods (relaxed setting): name -> ``resolve_method`` arguments (and, for
#: ``adapt_relative``, the registered controller that replaces the method's own).
METHODS: dict[str, dict[str, str]] = {
    "dense": {"method": "dense"},
    "static_balance": {"method": "static", "d_mode": "balance"},
    "sdst_strong": {"method": "sdst", "d_mode": "strong"},
    "adapt": {"method": "adapt", "setting": "relaxed"},
    "adapt_relative": {"method": "adapt", "setting": "relaxed", "controller": "relative"},
}
#: Per-iteration scalars kept from ``train_iteration``'s metrics (curves, tests).
CURVE_KEYS = ("loss/d", "loss/g", "br/ratio", "br/windowed", "density/g", "density/d",
              "control/action", "g_counts", "d_counts")
#: A data stream of its own, folded off the run key, so real batches never reuse G/D noise.
_DATA_STREAM = 0x2D
#: Evaluation noise, folded off the seed's key (never used in training).
_EVAL_STREAM = 0xE7A1


# ----------------------------------------------------------------------------- data


def mode_centres(dataset: str) -> np.ndarray:
    """Centres of the mixture, float32 (K, 2): ring (K=8, radius 2) or grid (K=25, spacing 2).

    >>> mode_centres("ring").shape, mode_centres("grid")[[0, -1]].tolist()
    ((8, 2), [[-4.0, -4.0], [4.0, 4.0]])
    """
    if dataset == "ring":
        angles = 2.0 * np.pi * np.arange(8) / 8
        return (2.0 * np.stack([np.cos(angles), np.sin(angles)], axis=-1)).astype(np.float32)
    if dataset == "grid":
        axis = np.arange(-4.0, 5.0, 2.0)
        return np.stack(np.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2).astype(
            np.float32)
    raise ValueError(f"Unknown `dataset` {dataset!r}; use one of {DATASETS}.")


def mode_std(dataset: str) -> float:
    """Standard deviation of every mixture component: 0.02 (ring), 0.05 (grid)."""
    if dataset not in DATASETS:
        raise ValueError(f"Unknown `dataset` {dataset!r}; use one of {DATASETS}.")
    return 0.02 if dataset == "ring" else 0.05


def sample_real(key: jax.Array, dataset: str, shape: Sequence[int]) -> jax.Array:
    """Samples of the mixture (uniform over modes), float32 ``(*shape, 2)``; jittable.

    >>> sample_real(jax.random.key(0), "ring", (3, 4)).shape
    (3, 4, 2)
    """
    centres = jnp.asarray(mode_centres(dataset))
    k_mode, k_noise = jax.random.split(key)
    modes = jax.random.randint(k_mode, tuple(shape), 0, centres.shape[0])
    noise = jax.random.normal(k_noise, (*shape, 2))
    return centres[modes] + mode_std(dataset) * noise


# ----------------------------------------------------------------------------- models


class MLPGenerator(nn.Module):
    """z (B, z_dim) -> points (B, 2): Dense + ReLU hidden layers, linear output.

    ``train`` is accepted (and unused) so the module fits the image runs' call signature; the
    MLP has no normalisation state.
    """

    z_dim: int = 16
    hidden: Sequence[int] = (128, 128, 128)
    out_dim: int = 2

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = True) -> jax.Array:
        del train
        x = z
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.out_dim)(x)


class MLPDiscriminator(nn.Module):
    """Points (B, 2) -> raw scores (B,): Dense + ReLU hidden layers, linear head (no sigmoid).

    With ``spectral_norm`` every kernel is divided by its largest singular value, as in the
    image D; ``update_stats`` then says whether the power iteration writes ``batch_stats``.
    """

    hidden: Sequence[int] = (128, 128, 128)
    spectral_norm: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, update_stats: bool = True) -> jax.Array:
        def dense(features: int, name: str, h: jax.Array) -> jax.Array:
            layer = nn.Dense(features, name=name)
            if not self.spectral_norm:
                return layer(h)
            return nn.SpectralNorm(layer, name=f"{name}_sn")(h, update_stats=update_stats)

        for i, width in enumerate(self.hidden):
            x = nn.relu(dense(width, f"Dense_{i}", x))
        return dense(1, "head", x)[:, 0]


# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """Hyperparameters of one 2-D run; the paper's schedules, shortened to the run length.

    Defaults (chosen on a 2-core CPU, see BUILD_NOTES.md): Adam 1e-3 with the paper's betas (0,
    0.9), since 2e-4 needs ~10x more iterations on these MLPs; n_dis = 1 (a spectrally
    normalised 2-D D is already strong: the dense run's BR sits at 0.4-0.8); z_dim = 2 (covers
    the ring far better than 16 in 2k iterations); an EMA decay of 0.99, whose horizon (100
    iterations) suits a 2k-iteration run. dT_G, dT_D and the BR window keep the paper's ratios
    (dT_D = 2 dT_G = the window), scaled down 10x; ``br_every = 2`` gives 50 window entries.

    Attributes:
      dataset: ``"ring"`` or ``"grid"``.
      g_density: d_G of every sparse method.
      iterations: iterations (n_dis D steps + one G step each).
      n_dis: D steps per iteration.
      batch_size: B_G = B_D.
      z_dim: noise dimension.
      g_hidden, d_hidden: hidden widths of the MLPs.
      d_spectral_norm: spectral norm on every D kernel, as in the image D.
      lr_g, lr_d, beta1, beta2: Adam.
      ema_decay: decay of G's sparse EMA.
      g_update_every: dT_G (iterations between G drop-and-grow updates).
      drop_fraction, drop_fraction_final: the cosine drop-fraction schedule's ends.
      br_every: iterations between BR measurements.
      br_window: BR window in iterations (``br_window // br_every`` entries).
      d_update_every: dT_D (iterations between ADAPT decisions).
      band: (B-, B+) of ADAPT.
      delta, d_min: ADAPT's density step and floor.
    """

    dataset: str = "ring"
    g_density: float = 0.1
    iterations: int = 2000
    n_dis: int = 1
    batch_size: int = 128
    z_dim: int = 2
    g_hidden: tuple[int, ...] = (128, 128, 128)
    d_hidden: tuple[int, ...] = (128, 128, 128)
    d_spectral_norm: bool = True
    lr_g: float = 1e-3
    lr_d: float = 1e-3
    beta1: float = 0.0
    beta2: float = 0.9
    ema_decay: float = 0.99
    g_update_every: int = 50
    drop_fraction: float = 0.5
    drop_fraction_final: float = 0.005
    br_every: int = 2
    br_window: int = 100
    d_update_every: int = 100
    band: tuple[float, float] = (0.45, 0.55)
    delta: float = 0.05
    d_min: float = 0.05


def method_spec(method: str, g_density: float) -> MethodSpec:
    """The ``MethodSpec`` of one of ``METHODS`` (relaxed setting: SDST-Strong has d_D = 1).

    >>> method_spec("sdst_strong", 0.1).d_density
    1.0
    """
    if method not in METHODS:
        raise ValueError(f"Unknown toy method {method!r}; use one of {tuple(METHODS)}.")
    return resolve_method(g_density=g_density,
                          **{k: v for k, v in METHODS[method].items() if k != "controller"})


@functools.cache
def build_setup(config: ToyConfig, method: str) -> setup_lib.GanSetup:
    """Models, Adam, schedules and the D-density controller of one method, as the image runs
    (``gan.setup.build_setup``).

    Cached: equal ``(config, method)`` give the same setup object, so its compiled iterations
    are reused across seeds (optax transformations compare by identity).
    """
    if config.dataset not in DATASETS:
        raise ValueError(f"Unknown `dataset` {config.dataset!r}; use one of {DATASETS}.")
    if config.iterations <= 0:
        raise ValueError(f"`iterations` must be positive, got {config.iterations}.")

    def adam(lr: float) -> optax.GradientTransformation:
        return optax.adam(lr, b1=config.beta1, b2=config.beta2)

    model = setup_lib.ModelSpec(
        MLPGenerator(z_dim=config.z_dim, hidden=tuple(config.g_hidden)),
        MLPDiscriminator(hidden=tuple(config.d_hidden), spectral_norm=config.d_spectral_norm),
        z_dim=config.z_dim, image_shape=(2,))
    return setup_lib.build_setup(
        model,
        setup_lib.TrainSpec(adam(config.lr_g), adam(config.lr_d), batch_g=config.batch_size,
                            batch_d=config.batch_size, n_dis=config.n_dis,
                            total_iterations=config.iterations, ema_decay=config.ema_decay),
        setup_lib.SparsitySpec(method_spec(method, config.g_density),
                               g_update_every=config.g_update_every,
                               drop_fraction=config.drop_fraction,
                               drop_fraction_final=config.drop_fraction_final),
        setup_lib.BalanceSpec(every=config.br_every,
                              window=balance.window_size(config.br_window, config.br_every)),
        control.ControlOptions(controller=METHODS[method].get("controller"),
                               every=config.d_update_every, band_low=config.band[0],
                               band_high=config.band[1], delta=config.delta,
                               d_min=config.d_min))


# ----------------------------------------------------------------------------- training


def train_chunk(setup: setup_lib.GanSetup, dataset: str, length: int,
                state: steps.TrainState) -> tuple[steps.TrainState, dict[str, jax.Array]]:
    """``length`` iterations in one ``lax.scan``, real batches drawn inside; jittable.

    Returns the new state and the ``CURVE_KEYS`` metrics stacked over the iterations
    (leading axis ``length``).
    """

    def body(state: steps.TrainState, _: None) -> tuple[steps.TrainState, dict[str, jax.Array]]:
        key = jax.random.fold_in(state.key, _DATA_STREAM)
        real = sample_real(key, dataset, (setup.train.n_dis, setup.train.batch_d))
        state, metrics = steps.train_iteration(setup, state, real)
        return state, {k: metrics[k] for k in CURVE_KEYS}

    return jax.lax.scan(body, state, None, length=length)


@functools.cache
def _compiled(setup: setup_lib.GanSetup, dataset: str, length: int) -> Callable:
    # One executable per (setup, chunk length), shared by every seed of a method.
    return jax.jit(functools.partial(train_chunk, setup, dataset, length), donate_argnums=0)


@functools.cache
def _init(setup: setup_lib.GanSetup) -> Callable:
    return jax.jit(functools.partial(steps.init_state, setup))


def init_state(setup: setup_lib.GanSetup, key: jax.Array) -> steps.TrainState:
    """Fresh params, ERK masks and an empty BR window from ``key`` (``steps.init_state``)."""
    return _init(setup)(key)


def train(setup: setup_lib.GanSetup, dataset: str, key: jax.Array, *, chunk: int = 500,
          state: steps.TrainState | None = None
          ) -> tuple[steps.TrainState, dict[str, np.ndarray]]:
    """Trains up to ``setup.train.total_iterations`` iterations from ``key`` (or from ``state``).

    Seeds run one after another rather than under ``vmap``: a batched step would turn the
    ``lax.cond``/``lax.switch`` of the mask updates into selects that sort every iteration.

    Args:
      setup: from ``build_setup``.
      dataset: ``"ring"`` or ``"grid"``.
      key: the run's PRNG key (params, masks, noise and data all derive from it); unused
        when ``state`` is given.
      chunk: iterations per compiled scan; the remainder runs as one shorter scan.
      state: optional starting state (e.g. from ``init_state``, to inspect the initial masks);
        it is donated, so do not use it afterwards.

    Returns:
      The final state and the curves: ``CURVE_KEYS`` -> numpy arrays with a leading axis over
      the iterations run (``g_counts``/``d_counts``: (T, num maskable leaves)).
    """
    state = init_state(setup, key) if state is None else state
    total = setup.train.total_iterations - int(state.step)
    pieces = []
    while total > 0:
        length = min(chunk, total)
        state, metrics = _compiled(setup, dataset, length)(state)
        pieces.append(jax.device_get(metrics))
        total -= length
    curves = {k: np.concatenate([p[k] for p in pieces]) for k in CURVE_KEYS} if pieces else {}
    return state, curves


def generate_samples(setup: setup_lib.GanSetup, state: steps.TrainState, key: jax.Array, n: int,
                     *, ema: bool = True) -> np.ndarray:
    """``n`` points (n, 2) from the masked generator (its sparse EMA by default)."""
    params = state.g_ema if ema else state.g_params
    z = jax.random.normal(key, (n, setup.model.z_dim))
    return np.asarray(steps.generate(setup, params, state.g_state, state.g_masks, z, train=False))


# ----------------------------------------------------------------------------- metrics


def mode_metrics(samples: np.ndarray, dataset: str, *, num_stds: float = 3.0,
                 min_fraction: float = 0.1) -> dict[str, Any]:
    """Mode coverage and sample quality of 2-D samples.

    A sample is *high quality* if it lies within ``num_stds`` standard deviations (Euclidean
    distance) of some mode centre. A mode is *covered* if at least ``min_fraction * N / K`` of
    the N samples (and at least one) are high-quality samples of that mode: a fraction of the
    share a perfect generator would give it.

    Args:
      samples: (N, 2) points.
      dataset: ``"ring"`` or ``"grid"`` (centres and std).
      num_stds: the quality radius in units of the component std.
      min_fraction: the coverage threshold as a fraction of N / K.

    Returns:
      ``modes_covered`` (int), ``high_quality`` (fraction in [0, 1]), ``num_modes`` (K) and
      ``counts`` (int (K,), high-quality samples per mode).

    >>> m = mode_metrics(mode_centres("ring"), "ring")
    >>> m["modes_covered"], m["high_quality"]
    (8, 1.0)
    """
    centres = mode_centres(dataset)
    x = np.asarray(samples, np.float64).reshape(-1, 2)
    if x.shape[0] == 0:
        raise ValueError("`samples` is empty.")
    dist = np.linalg.norm(x[:, None, :] - centres[None, :, :], axis=-1)
    nearest = np.argmin(dist, axis=1)
    # Non-finite samples (a diverged G) are simply not high quality.
    good = np.take_along_axis(dist, nearest[:, None], 1)[:, 0] <= num_stds * mode_std(dataset)
    counts = np.bincount(nearest[good], minlength=len(centres))
    threshold = max(1.0, min_fraction * x.shape[0] / len(centres))
    return {
        "modes_covered": int(np.sum(counts >= threshold)),
        "high_quality": float(np.mean(good)),
        "num_modes": len(centres),
        "counts": counts,
    }


def final_br(curves: dict[str, np.ndarray]) -> float:
    """The windowed BR after the last iteration (NaN if never measured)."""
    return float(curves["br/windowed"][-1])


def late_br_median(curves: dict[str, np.ndarray], fraction: float = 0.5) -> float:
    """Median of the finite BR measurements in the last ``fraction`` of the run (NaN if none).

    A robust companion to ``final_br``: with a Lipschitz D the gap c - b is sometimes tiny, and
    one huge ratio can dominate a mean of ratios.

    >>> late_br_median({"br/ratio": np.array([9.0, 9.0, 9.0, 9.0, 0.4, np.nan, 0.6, 0.5])})
    0.5
    """
    ratios = np.asarray(curves["br/ratio"], np.float64)
    late = ratios[int(len(ratios) * (1.0 - fraction)):]
    late = late[np.isfinite(late)]
    return float(np.median(late)) if late.size else float("nan")


def final_d_density(state: steps.TrainState, setup: setup_lib.GanSetup) -> float:
    """D's overall density at the end of a run (1.0 for the dense method)."""
    return float(sp.density(state.d_masks, is_maskable=setup.model.is_maskable))


def evaluate(setup: setup_lib.GanSetup, state: steps.TrainState, curves: dict[str, np.ndarray],
             dataset: str, key: jax.Array, *, num_samples: int = 10_000, ema: bool = True,
             min_fraction: float = 0.1) -> dict[str, Any]:
    """The benchmark's four numbers for one run, the late BR median and the samples used."""
    samples = generate_samples(setup, state, key, num_samples, ema=ema)
    m = mode_metrics(samples, dataset, min_fraction=min_fraction)
    return {
        "modes_covered": m["modes_covered"],
        "high_quality": m["high_quality"],
        "br": final_br(curves),
        "br_median_late": late_br_median(curves),
        "d_density": final_d_density(state, setup),
        "samples": samples,
    }


def run(config: ToyConfig, method: str, seed: int, *, num_samples: int = 10_000,
        ema: bool = True, min_fraction: float = 0.1, chunk: int = 500) -> dict[str, Any]:
    """Trains one method from ``seed`` and evaluates it (see ``evaluate``).

    Returns ``evaluate``'s dict plus ``curves`` (from ``train``) and the final ``state``.
    Equal ``(config, method)`` compile once per process: seeds share the executable.
    """
    setup = build_setup(config, method)
    key = jax.random.key(seed)
    state, curves = train(setup, config.dataset, key, chunk=chunk)
    result = evaluate(setup, state, curves, config.dataset, jax.random.fold_in(key, _EVAL_STREAM),
                      num_samples=num_samples, ema=ema, min_fraction=min_fraction)
    return {**result, "curves": curves, "state": state}
