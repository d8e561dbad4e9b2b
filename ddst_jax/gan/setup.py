"""The static description of a run (``GanSetup``) and its one constructor, ``build_setup``.

A ``GanSetup`` is grouped the way the config is, and every default lives here once:

  ``setup.model``     ``ModelSpec``     the networks, their inputs, what is maskable
  ``setup.sparsity``  ``SparsitySpec``  the method, layer densities, G's drop-and-grow schedule
  ``setup.balance``   ``BalanceSpec``   how BR is measured and averaged
  ``setup.control``   a controller      D's density decisions (``ddst_jax.control``)
  ``setup.train``     ``TrainSpec``     optimizers, batches, n_dis, length, EMA, D-step structure

``build_setup`` counts D's maskable weights from the model and builds the controller from the
registry, so the runner, toy2d, the FLOPs tool, the benchmarks and the tests all describe a run
the same way. Everything in a setup is static (hashable): it is closed over by the jitted
iteration (``ddst_jax.gan.steps``).

Typical use::

    pair = registry.build("sngan32")
    setup = build_setup(pair, TrainSpec(optax.adam(2e-4, b1=0.0, b2=0.9),
                                        optax.adam(2e-4, b1=0.0, b2=0.9), batch_g=128,
                                        batch_d=64, n_dis=5, total_iterations=100_000),
                        SparsitySpec(resolve_method("adapt", g_density=0.1)))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ddst_jax import balance, control
from ddst_jax import sparsity as sp
from ddst_jax.gan.methods import MethodSpec

#: How a D step scores the real and the fake batch (``TrainSpec.d_forward``).
D_FORWARDS = ("separate", "concat")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The networks and their inputs.

    Attributes:
      generator: ``G(z, train)``, or ``G(z, y, train)`` when ``num_classes`` > 0.
      discriminator: ``D(x, update_stats)`` or ``D(x, y, update_stats)``; raw scores (B,).
      z_dim: noise dimension.
      image_shape: (H, W, C) of one image (or any per-sample shape, e.g. (2,) for points).
      num_classes: 0 for unconditional models.
      is_maskable: the maskable predicate ``(path, leaf) -> bool``; None: the library default.
    """

    generator: nn.Module
    discriminator: nn.Module
    z_dim: int
    image_shape: tuple[int, ...]
    num_classes: int = 0
    is_maskable: Callable[..., bool] | None = None


@dataclasses.dataclass(frozen=True)
class SparsitySpec:
    """The method and G's dynamic sparse training (docs/method.md sections 3, 4 and 6).

    Attributes:
      method: from ``gan.methods.resolve_method``.
      g_update_every: dT_G, iterations between G's drop-and-grow updates.
      drop_fraction, drop_fraction_final: f_0 and f_min of the cosine drop fraction.
      distribution: initial layer densities, ``"erk"`` or ``"uniform"``.
      erk_power: ERK's exponent.
      mask_sampling: ``"exact"`` counts or ``"bernoulli"`` draws (``sparsity.init_masks``).
    """

    method: MethodSpec
    g_update_every: int = 500
    drop_fraction: float = 0.5
    drop_fraction_final: float = 0.005
    distribution: str = "erk"
    erk_power: float = 1.0
    mask_sampling: str = "exact"


@dataclasses.dataclass(frozen=True)
class BalanceSpec:
    """How BR is measured and averaged (docs/method.md section 2).

    Attributes:
      every: iterations between measurements.
      window: entries of the window (``balance.window_size``: 1000 iterations / 10 = 100).
      eps: |c - b| below this makes a measurement non-finite; 0: no guard.
      train_mode_forwards: run the a and c forwards in train mode, advancing G's BatchNorm and
        D's spectral-norm state, as the paper's code does (default: no state written).
      ignore_nonfinite: the logged windowed BR skips non-finite ratios (else ``np.mean``'s).
    """

    every: int = 10
    window: int = 100
    eps: float = balance.DEFAULT_EPS
    train_mode_forwards: bool = False
    ignore_nonfinite: bool = True


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """Optimizers, batches and the shape of one iteration.

    Attributes:
      g_tx, d_tx: optax transformations of G and D.
      batch_g, batch_d: global batch of the G step and of each D step (real and fake alike).
      n_dis: D steps per iteration.
      total_iterations: the run's length.
      ema_decay: decay of G's sparse EMA.
      unroll_d_steps: unroll the n_dis D steps (on XLA:CPU convolutions inside a while loop take
        a slow path: a dense width-64 SNGAN iteration measured 27.9 s rolled, 1.3 s unrolled).
      d_forward: ``"separate"`` scores real and fake in two D forwards per D step (the paper's
        code: two spectral-norm power iterations); ``"concat"`` in one.
    """

    g_tx: optax.GradientTransformation
    d_tx: optax.GradientTransformation
    batch_g: int
    batch_d: int
    n_dis: int
    total_iterations: int
    ema_decay: float = 0.999
    unroll_d_steps: bool = True
    d_forward: str = "separate"

    def __post_init__(self) -> None:
        if self.d_forward not in D_FORWARDS:
            raise ValueError(f"Unknown d_forward {self.d_forward!r}; use one of {D_FORWARDS}.")


@dataclasses.dataclass(frozen=True)
class GanSetup:
    """Static description of a run's iteration; build it with ``build_setup``."""

    model: ModelSpec
    train: TrainSpec
    sparsity: SparsitySpec
    balance: BalanceSpec
    control: control.Controller


def _model_spec(model: Any) -> ModelSpec:
    """A ``ModelSpec`` from itself or from a ``gan.registry.ModelPair``."""
    if isinstance(model, ModelSpec):
        return model
    return ModelSpec(model.generator, model.discriminator, model.z_dim,
                     (model.image_size, model.image_size, 3), model.num_classes,
                     model.is_maskable)


def d_maskable_count(model: ModelSpec) -> int:
    """N_D: D's maskable weights, from an abstract init (nothing is allocated)."""
    x = jnp.zeros((1, *model.image_shape))
    args = (x, jnp.zeros((1,), jnp.int32)) if model.num_classes else (x,)
    params = jax.eval_shape(lambda: model.discriminator.init(jax.random.key(0), *args))
    return sp.num_maskable(params["params"], is_maskable=model.is_maskable)


def build_setup(model: Any, train: TrainSpec, sparsity: SparsitySpec,
                balance_spec: BalanceSpec | None = None,
                control_options: control.ControlOptions | None = None) -> GanSetup:
    """The run description: the controller built for this model, method and length.

    Args:
      model: a ``ModelSpec`` or a ``gan.registry.ModelPair``.
      train, sparsity: see the specs.
      balance_spec: BR measurement (default ``BalanceSpec()``).
      control_options: the config's control block; ``controller=None`` picks the method's own
        (``"static"`` for dense, static and SDST; ``"relaxed"``, ``"strict"`` or ``"dda"``).
    """
    model = _model_spec(model)
    balance_spec = BalanceSpec() if balance_spec is None else balance_spec
    control_options = control.ControlOptions() if control_options is None else control_options
    method = sparsity.method
    name = control_options.controller or method.d_control
    if method.d_control == "static" and name != "static":
        raise ValueError(f"control.controller={name!r} needs a method whose D density moves "
                         f"(adapt or dda), not {method.name!r}.")
    context = control.ControllerContext(
        n_weights=d_maskable_count(model), total_iterations=train.total_iterations,
        d_start=method.d_density, cap=method.d_cap, kind=method.d_control)
    controller = control.make_controller(name, control_options, context)
    return GanSetup(model, train, sparsity, balance_spec, controller)
