"""The sparse-GAN train state and one training iteration as a single jitted function.

One iteration (docs/method.md sections 2, 4-6; docs/design.md has the data flow) = ``n_dis`` D
steps in a ``lax.scan`` -> one G step that also yields b = mean D(G_pre(z)) -> every
``balance.every`` iterations the BR forwards a = mean D(G_post(z)) and c = mean D(x_r) -> every
dT_G iterations G's drop-and-grow -> D's controller and ``control.apply_decision`` -> the sparse
EMA of G. Masks are multiplied into the parameters inside every forward; the scheduled updates
run under ``lax.cond`` / ``lax.switch`` so mask changes never retrace or recompile.

As in the paper's code, each D step scores the real and the fake batch in two D forwards (two
spectral-norm power iterations, each batch normalised by its own sigma estimate);
``TrainSpec.d_forward="concat"`` scores them in one forward instead. The BR forwards leave every
state untouched unless ``BalanceSpec.train_mode_forwards`` asks for the paper code's train-mode
forwards (G's BatchNorm statistics and D's spectral-norm state advance, one power iteration each
for a and for c).

The public step functions (``draw_noise``, ``d_steps``, ``g_step``, ``br_forwards``,
``g_mask_update``, ``d_density_update``, ``sparse_ema``) are the pieces of
``train_iteration``, for benchmarks, tests and custom loops; they return named tuples.

Under a bfloat16 compute dtype (``config.model.compute_dtype``) only the activations inside G
and D are bfloat16: the models take float32 noise and images, cast float32 params in each layer
(so gradients w.r.t. params come back float32) and return float32 images and scores. Everything
here (masks, optimizer updates, EMA, losses, BR, drop-and-grow scores and the exact integer
counts) therefore runs on float32 values, unchanged.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddst_jax import balance, control
from ddst_jax import sparsity as sp
from ddst_jax.gan import losses
from ddst_jax.gan.setup import D_FORWARDS, GanSetup  # noqa: F401 (re-exported)

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue the same trajectory (a pytree).

    Attributes:
      step: int32, completed iterations.
      g_params, d_params: parameters (inactive entries are exactly 0).
      g_state: G's BatchNorm running statistics; d_state: D's spectral-norm u/sigma.
      g_opt, d_opt: optimizer states.
      g_masks, d_masks: bool masks like the params.
      g_ema: EMA of G's parameters, kept sparse with G's mask.
      br_window: the BR ring buffer.
      controller: D-density controller state (target active count).
      key: typed PRNG key of the run.
    """

    step: jax.Array
    g_params: PyTree
    g_state: PyTree
    d_params: PyTree
    d_state: PyTree
    g_opt: PyTree
    d_opt: PyTree
    g_masks: PyTree
    d_masks: PyTree
    g_ema: PyTree
    br_window: balance.BRWindow
    controller: control.ControllerState
    key: jax.Array


class IterationNoise(NamedTuple):
    """The random inputs of one iteration (a pytree).

    Attributes:
      z_d: (n_dis, B_D, z_dim) float32 noise of the D steps' fake batches.
      y_d: (n_dis, B_D) int32 labels of those fakes; None for unconditional models.
      z_g: (B_G, z_dim) float32 noise of the G step (the BR's a forward reuses it).
      y_g: (B_G,) int32 labels of the G step; None for unconditional models.
    """

    z_d: jax.Array
    y_d: jax.Array | None
    z_g: jax.Array
    y_g: jax.Array | None


class DStepsResult(NamedTuple):
    """What ``d_steps`` returns: D after the n_dis steps, G's BatchNorm state after the fake
    batches, the last step's D gradient (w.r.t. w*m; D's grow score) and the n_dis losses."""

    d_params: PyTree
    d_state: PyTree
    d_opt: PyTree
    g_state: PyTree
    d_grads: PyTree
    d_losses: jax.Array


class GStepResult(NamedTuple):
    """What ``g_step`` returns: G after its step, D's spectral-norm state after the G-loss
    forward, the loss, G's gradient (w.r.t. w*m; G's grow score) and the b-scores D(G_pre(z))."""

    g_params: PyTree
    g_state: PyTree
    g_opt: PyTree
    d_state: PyTree
    loss: jax.Array
    grads: PyTree
    b_scores: jax.Array


class BRForwards(NamedTuple):
    """What ``br_forwards`` returns: a-scores D(G_post(z)), c-scores D(x_r), and G's and D's
    states after them (unchanged unless ``BalanceSpec.train_mode_forwards``)."""

    a_scores: jax.Array
    c_scores: jax.Array
    g_state: PyTree
    d_state: PyTree


def g_apply(setup: GanSetup, variables: PyTree, z: jax.Array, y: jax.Array | None, *,
            train: bool, **kwargs):
    """``G.apply`` for conditional (``y`` (B,) int32) and unconditional models alike."""
    args = (z, y) if setup.model.num_classes else (z,)
    return setup.model.generator.apply(variables, *args, train=train, **kwargs)


def d_apply(setup: GanSetup, variables: PyTree, x: jax.Array, y: jax.Array | None, *,
            update_stats: bool = True, **kwargs):
    """``D.apply`` for conditional (``y`` (B,) int32) and unconditional models alike."""
    args = (x, y) if setup.model.num_classes else (x,)
    return setup.model.discriminator.apply(variables, *args, update_stats=update_stats, **kwargs)


def sample_labels(key: jax.Array, batch: int, setup: GanSetup) -> jax.Array | None:
    """Uniform class labels for fake images (None for unconditional models)."""
    if not setup.model.num_classes:
        return None
    return jax.random.randint(key, (batch,), 0, setup.model.num_classes, dtype=jnp.int32)


def _masked(params: PyTree, masks: PyTree, setup: GanSetup) -> PyTree:
    return sp.apply_masks(params, masks) if setup.sparsity.method.masked else params


def _densities(params: PyTree, density: float, setup: GanSetup, distribution: str,
               power: float) -> PyTree:
    return sp.layer_densities(params, density, distribution, is_maskable=setup.model.is_maskable,
                              power=power)


def init_state(setup: GanSetup, key: jax.Array) -> TrainState:
    """Initial state: fresh params, masks from ``key`` (``setup.sparsity``'s layer densities and
    sampling), an empty BR window, the controller's initial state.

    Every process that calls this with the same key draws the same params and masks.
    """
    distribution, erk_power = setup.sparsity.distribution, setup.sparsity.erk_power
    k_g, k_d, k_gm, k_dm, k_run = jax.random.split(key, 5)
    z = jnp.zeros((1, setup.model.z_dim))
    y = jnp.zeros((1,), jnp.int32) if setup.model.num_classes else None
    g_vars = setup.model.generator.init(k_g, *((z, y) if y is not None else (z,)), train=False)
    d_vars = setup.model.discriminator.init(
        k_d, *((jnp.zeros((1, *setup.model.image_shape)), y) if y is not None
               else (jnp.zeros((1, *setup.model.image_shape)),)))
    g_params, d_params = g_vars["params"], d_vars["params"]
    m = setup.sparsity.method
    if m.masked:
        sampling = setup.sparsity.mask_sampling
        g_masks = sp.init_masks(k_gm, g_params, _densities(g_params, m.g_density, setup,
                                distribution, erk_power), is_maskable=setup.model.is_maskable,
                                sampling=sampling)
        d_masks = sp.init_masks(k_dm, d_params, _densities(d_params, m.d_density, setup,
                                distribution, erk_power), is_maskable=setup.model.is_maskable,
                                sampling=sampling)
    else:
        g_masks, d_masks = sp.dense_masks(g_params), sp.dense_masks(d_params)
    g_params = sp.apply_masks(g_params, g_masks)
    d_params = sp.apply_masks(d_params, d_masks)
    d_count = sp.count_active(d_masks, is_maskable=setup.model.is_maskable)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        g_params=g_params,
        g_state=g_vars.get("batch_stats", {}),
        d_params=d_params,
        d_state=d_vars.get("batch_stats", {}),
        g_opt=setup.train.g_tx.init(g_params),
        d_opt=setup.train.d_tx.init(d_params),
        g_masks=g_masks,
        d_masks=d_masks,
        g_ema=jax.tree_util.tree_map(jnp.copy, g_params),  # own buffers: state is donated
        br_window=balance.init_window(setup.balance.window),
        controller=setup.control.init(jnp.asarray(d_count, jnp.int32)),
        key=k_run,
    )


def generate(setup: GanSetup, params: PyTree, g_state: PyTree, masks: PyTree, z: jax.Array,
             y: jax.Array | None = None, *, train: bool = True) -> jax.Array:
    """Images from G with masked ``params`` (e.g. the EMA); G's state is not written.

    ``y`` (B,) int32 labels are required for conditional models.
    """
    if setup.model.num_classes and y is None:
        raise ValueError("A class-conditional generator needs labels `y`.")
    variables = {"params": _masked(params, masks, setup), "batch_stats": g_state}
    if train:
        images, _ = g_apply(setup, variables, z, y, train=True, mutable=["batch_stats"])
        return images
    return g_apply(setup, variables, z, y, train=False)


def _sharded(x: jax.Array, sharding) -> jax.Array:
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def draw_noise(setup: GanSetup, key: jax.Array) -> IterationNoise:
    """The noise and fake labels of one iteration, from ``key`` (the iteration's noise keys).

    >>> import jax, flax.linen as nn, optax
    >>> from ddst_jax.gan import setup as setup_lib
    >>> from ddst_jax.gan.methods import resolve_method
    >>> s = setup_lib.build_setup(
    ...     setup_lib.ModelSpec(nn.Dense(1), nn.Dense(1), z_dim=4, image_shape=(3,)),
    ...     setup_lib.TrainSpec(optax.sgd(0.1), optax.sgd(0.1), batch_g=3, batch_d=2, n_dis=5,
    ...                         total_iterations=1),
    ...     setup_lib.SparsitySpec(resolve_method("dense", g_density=1.0)))
    >>> noise = draw_noise(s, jax.random.key(0))
    >>> noise.z_d.shape, noise.z_g.shape, noise.y_d
    ((5, 2, 4), (3, 4), None)
    """
    k_d, k_g = jax.random.split(key)

    def draw(k, batch):
        k_z, k_y = jax.random.split(k)
        z = jax.random.normal(k_z, (batch, setup.model.z_dim))
        return z, sample_labels(k_y, batch, setup)

    train = setup.train
    z_d, y_d = jax.vmap(lambda k: draw(k, train.batch_d))(jax.random.split(k_d, train.n_dis))
    z_g, y_g = draw(k_g, train.batch_g)
    return IterationNoise(z_d, y_d, z_g, y_g)


def _d_scores(setup: GanSetup, d_eff: PyTree, d_state: PyTree, x_real, y_real, fake, y_fake):
    """D's scores of the real and the fake batch, with the state after the forward(s)."""
    if setup.train.d_forward == "concat":
        y_both = None if y_fake is None else jnp.concatenate([y_real, y_fake])
        scores, upd = d_apply(setup, {"params": d_eff, "batch_stats": d_state},
                              jnp.concatenate([x_real, fake]), y_both, mutable=["batch_stats"])
        n = x_real.shape[0]
        return scores[:n], scores[n:], upd["batch_stats"]
    # Two forwards, real first as in the paper's code: the fake batch sees the u that the real
    # forward's power iteration left (Flax stops gradients through u).
    y_real = None if y_fake is None else y_real
    s_real, upd = d_apply(setup, {"params": d_eff, "batch_stats": d_state}, x_real, y_real,
                          mutable=["batch_stats"])
    s_fake, upd = d_apply(setup, {"params": d_eff, "batch_stats": upd["batch_stats"]}, fake,
                          y_fake, mutable=["batch_stats"])
    return s_real, s_fake, upd["batch_stats"]


def d_steps(setup: GanSetup, state: TrainState, real: jax.Array, real_labels: jax.Array,
            noise: IterationNoise, z_sharding=None) -> DStepsResult:
    """The n_dis D updates of an iteration (a ``lax.scan``; G frozen, in train mode).

    Args:
      setup, state: the run and its state before the iteration.
      real: (n_dis, B_D, H, W, 3) real batches; real_labels: (n_dis, B_D) int32.
      noise: the iteration's noise (``draw_noise``).
      z_sharding: optional sharding of a (B_D, z_dim) noise batch.
    """
    g_eff = _masked(state.g_params, state.g_masks, setup)
    policy = setup.sparsity.method.policy

    def one_step(carry, inputs):
        d_params, d_state, d_opt, g_state, _ = carry
        x_real, y_real, z, y_fake = inputs
        fake, g_upd = g_apply(setup, {"params": g_eff, "batch_stats": g_state},
                              _sharded(z, z_sharding), y_fake, train=True,
                              mutable=["batch_stats"])
        fake = jax.lax.stop_gradient(fake)

        def loss_fn(d_eff):
            s_real, s_fake, new_state = _d_scores(setup, d_eff, d_state, x_real, y_real, fake,
                                                  y_fake)
            return losses.d_hinge_loss(s_real, s_fake), new_state

        d_eff = _masked(d_params, state.d_masks, setup)
        # Gradient w.r.t. the effective weights w*m: dense, as the paper's code feeds Adam.
        (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(d_eff)
        if setup.sparsity.method.masked:
            d_params, d_opt = sp.sparse_update(setup.train.d_tx, grads, d_opt, d_params,
                                               state.d_masks, policy)
        else:
            updates, d_opt = setup.train.d_tx.update(grads, d_opt, d_params)
            d_params = optax.apply_updates(d_params, updates)
        return (d_params, new_state, d_opt, g_upd["batch_stats"], grads), loss

    zero_grads = jax.tree_util.tree_map(jnp.zeros_like, state.d_params)
    carry = (state.d_params, state.d_state, state.d_opt, state.g_state, zero_grads)
    (d_params, d_state, d_opt, g_state, d_grads), d_losses = jax.lax.scan(
        one_step, carry, (real, real_labels, noise.z_d, noise.y_d),
        unroll=setup.train.unroll_d_steps)
    return DStepsResult(d_params, d_state, d_opt, g_state, d_grads, d_losses)


def g_step(setup: GanSetup, state: TrainState, d_params: PyTree, d_state: PyTree,
           g_state: PyTree, noise: IterationNoise, z_sharding=None) -> GStepResult:
    """One G update against the D of ``d_params``/``d_state`` (D frozen, its SN state advances).

    ``g_state`` is G's BatchNorm state after the D steps; the loss's D forward gives b.
    """
    d_eff = _masked(d_params, state.d_masks, setup)
    z, y = _sharded(noise.z_g, z_sharding), noise.y_g

    def loss_fn(g_eff):
        fake, g_upd = g_apply(setup, {"params": g_eff, "batch_stats": g_state}, z, y,
                              train=True, mutable=["batch_stats"])
        scores, d_upd = d_apply(setup, {"params": d_eff, "batch_stats": d_state}, fake, y,
                                mutable=["batch_stats"])
        return losses.g_hinge_loss(scores), (scores, g_upd["batch_stats"], d_upd["batch_stats"])

    g_eff = _masked(state.g_params, state.g_masks, setup)
    (loss, (b_scores, g_state, d_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(g_eff)
    if setup.sparsity.method.masked:
        g_params, g_opt = sp.sparse_update(setup.train.g_tx, grads, state.g_opt, state.g_params,
                                           state.g_masks, setup.sparsity.method.policy)
    else:
        updates, g_opt = setup.train.g_tx.update(grads, state.g_opt, state.g_params)
        g_params = optax.apply_updates(state.g_params, updates)
    return GStepResult(g_params, g_state, g_opt, d_state, loss, grads, b_scores)


def br_forwards(setup: GanSetup, g_params, g_state, g_masks, d_params, d_state, d_masks, z, y,
                x_real, y_real) -> BRForwards:
    """The BR's a-scores D(G_post(z)) and c-scores D(x_r) (docs/method.md section 2).

    By default nothing is written: G's BatchNorm updates are discarded and D runs with
    ``update_stats=False``, in one forward over both batches (D has no batch-coupled layer and
    both halves see the same u, so the scores equal two forwards). With
    ``setup.balance.train_mode_forwards`` they run as the paper's code runs them: G in train
    mode with its BatchNorm statistics updated, then D(G_post(z)) and D(x_r) as two train-mode
    forwards, each advancing the spectral-norm state by one power iteration.
    """
    d_vars = {"params": _masked(d_params, d_masks, setup), "batch_stats": d_state}
    g_vars = {"params": _masked(g_params, g_masks, setup), "batch_stats": g_state}
    if setup.balance.train_mode_forwards:
        fake_post, g_upd = g_apply(setup, g_vars, z, y, train=True, mutable=["batch_stats"])
        a_scores, d_upd = d_apply(setup, d_vars, fake_post, y, mutable=["batch_stats"])
        c_scores, d_upd = d_apply(setup, {**d_vars, "batch_stats": d_upd["batch_stats"]},
                                  x_real, y_real if y is not None else None,
                                  mutable=["batch_stats"])
        return BRForwards(a_scores, c_scores, g_upd["batch_stats"], d_upd["batch_stats"])
    fake_post, _ = g_apply(setup, g_vars, z, y, train=True, mutable=["batch_stats"])
    y_both = None if y is None else jnp.concatenate([y, y_real])
    scores = d_apply(setup, d_vars, jnp.concatenate([fake_post, x_real]), y_both,
                     update_stats=False)
    n_fake = fake_post.shape[0]
    return BRForwards(scores[:n_fake], scores[n_fake:], g_state, d_state)


def _grow_scores(setup: GanSetup, grads: PyTree, masks: PyTree, key: jax.Array) -> PyTree:
    if setup.sparsity.method.regrow == "rigl":
        return sp.gradient_scores(grads)
    return sp.random_scores(key, masks)


def _drop_fraction(setup: GanSetup, t) -> jax.Array:
    sp_spec = setup.sparsity
    return sp.cosine_drop_fraction(t, setup.train.total_iterations, sp_spec.drop_fraction,
                                   sp_spec.drop_fraction_final)


def g_mask_update(setup: GanSetup, t, g_params, g_masks, g_opt, g_grads, key):
    """G's drop-and-grow after iteration ``t`` when it is an update step (``lax.cond``);
    returns (params, masks, optimizer state)."""
    method, pred = setup.sparsity.method, setup.model.is_maskable

    def update(operands):
        params, masks, opt = operands
        upd = sp.drop_and_grow_update(masks, sp.magnitude_scores(params),
                                      _grow_scores(setup, g_grads, masks, key),
                                      _drop_fraction(setup, t), scope=method.scope,
                                      is_maskable=pred)
        opt = sp.optimizer_state_after_regrowth(setup.train.g_tx, opt, upd.grown, method.policy)
        return sp.params_after_update(params, upd), upd.masks, opt

    do = sp.is_update_step(t, setup.sparsity.g_update_every, setup.train.total_iterations)
    return jax.lax.cond(do, update, lambda o: o, (g_params, g_masks, g_opt))


def d_density_update(setup: GanSetup, t, ctrl_state, window, d_params, d_masks, d_opt, d_grads,
                     key):
    """D's controller step and ``control.apply_decision`` on D's masks; returns (controller
    state, decision, params, masks, optimizer state)."""
    method = setup.sparsity.method
    ctrl_state, decision = setup.control.step(ctrl_state, window, t)
    upd = control.apply_decision(
        d_masks, decision, sp.magnitude_scores(d_params),
        _grow_scores(setup, d_grads, d_masks, key), drop_fraction=_drop_fraction(setup, t),
        scope=method.scope, is_maskable=setup.model.is_maskable)
    d_opt = sp.optimizer_state_after_regrowth(setup.train.d_tx, d_opt, upd.grown, method.policy)
    return ctrl_state, decision, sp.params_after_update(d_params, upd), upd.masks, d_opt


def sparse_ema(ema: PyTree, masks: PyTree, params: PyTree, decay: float) -> PyTree:
    """One step of G's sparse EMA: ``decay * (ema * mask) + (1 - decay) * params``, per leaf.

    Multiplying by the current mask every iteration equals docs/method.md section 5's "multiply
    on mask change" because inactive EMA entries are already 0 otherwise.
    """
    return jax.tree_util.tree_map(
        lambda e, m, p: decay * jnp.where(m, e, 0.0) + (1.0 - decay) * p, ema, masks, params)


def train_iteration(setup: GanSetup, state: TrainState, real: jax.Array,
                    real_labels: jax.Array | None = None, z_sharding=None,
                    noise: IterationNoise | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One iteration: n_dis D steps, G step, BR, mask updates, EMA.

    Args:
      setup: static run description.
      state: the train state after ``state.step`` iterations.
      real: (n_dis, B_D, H, W, 3) float32 real batches in [-1, 1], one per D step.
      real_labels: (n_dis, B_D) int32 labels of ``real`` (conditional models; else ignored).
      z_sharding: optional sharding for noise batches (batch axis on the data mesh axis).
      noise: the iteration's noise; None: drawn from the state's key (``draw_noise``). Given
        noise (e.g. to replay another implementation's iteration) still advances the key.

    Returns:
      The new state and a dict of scalar metrics (``br/ratio``, ``br/a``, ``br/b``, ``br/c``
      are NaN when not measured) plus ``loss/d_steps``, the (n_dis,) D losses, and
      ``g_counts``/``d_counts``, int32 per-leaf active counts.
    """
    key, k_noise, k_gm, k_dm = jax.random.split(state.key, 4)
    t = state.step + 1
    if real_labels is None:
        real_labels = jnp.zeros(real.shape[:2], jnp.int32)
    if noise is None:
        noise = draw_noise(setup, k_noise)
    d_params, d_state, d_opt, g_state, d_grads, d_losses = d_steps(
        setup, state, real, real_labels, noise, z_sharding)
    g_params, g_state, g_opt, d_state, g_loss, g_grads, b_scores = g_step(
        setup, state, d_params, d_state, g_state, noise, z_sharding)

    measure = balance.is_measure_step(t, setup.balance.every)

    def measure_br(states):
        g_st, d_st = states
        br = br_forwards(setup, g_params, g_st, state.g_masks, d_params, d_st, state.d_masks,
                         _sharded(noise.z_g, z_sharding), noise.y_g, real[-1], real_labels[-1])
        ratio = balance.balance_ratio(br.c_scores, b_scores, br.a_scores, setup.balance.eps)
        abc = jnp.stack([jnp.mean(br.a_scores), jnp.mean(b_scores), jnp.mean(br.c_scores)])
        return ratio, abc, br.g_state, br.d_state

    def skip(states):
        return (jnp.float32(jnp.nan), jnp.full((3,), jnp.nan, jnp.float32), *states)

    ratio, abc, g_state, d_state = jax.lax.cond(measure, measure_br, skip, (g_state, d_state))
    window = jax.lax.cond(measure, lambda w: balance.push(w, ratio), lambda w: w,
                          state.br_window)

    g_masks = state.g_masks
    if setup.sparsity.method.g_dynamic:
        g_params, g_masks, g_opt = g_mask_update(setup, t, g_params, g_masks, g_opt, g_grads,
                                                 k_gm)
    d_masks, ctrl_state = state.d_masks, state.controller
    action = jnp.asarray(control.NONE, jnp.int32)
    if getattr(setup.control, "kind", None) != "static":  # a static controller never acts
        ctrl_state, decision, d_params, d_masks, d_opt = d_density_update(
            setup, t, ctrl_state, window, d_params, d_masks, d_opt, d_grads, k_dm)
        action = decision.action

    g_ema = sparse_ema(state.g_ema, g_masks, g_params, setup.train.ema_decay)

    new_state = TrainState(
        step=t, g_params=g_params, g_state=g_state, d_params=d_params, d_state=d_state,
        g_opt=g_opt, d_opt=d_opt, g_masks=g_masks, d_masks=d_masks, g_ema=g_ema,
        br_window=window, controller=ctrl_state, key=key)
    n_g = max(1, sp.num_maskable(g_masks, is_maskable=setup.model.is_maskable))
    n_d = max(1, sp.num_maskable(d_masks, is_maskable=setup.model.is_maskable))
    g_counts = sp.layer_counts(g_masks, setup.model.is_maskable)
    d_counts = sp.layer_counts(d_masks, setup.model.is_maskable)
    metrics = {
        "loss/d": jnp.mean(d_losses),
        "loss/d_steps": d_losses,
        "loss/g": g_loss,
        "br/ratio": ratio,
        "br/a": abc[0],  # mean D(G_post(z)); NaN when not measured
        "br/b": abc[1],  # mean D(G_pre(z))
        "br/c": abc[2],  # mean D(x_r)
        "br/windowed": balance.windowed_mean(
            window, ignore_nonfinite=setup.balance.ignore_nonfinite),
        "br/ignored": balance.num_ignored(window),
        "br/window_full": balance.is_full(window),
        "density/g": jnp.sum(g_counts) / np.float32(n_g),
        "density/d": jnp.sum(d_counts) / np.float32(n_d),
        "control/action": action,
        "g_counts": g_counts,
        "d_counts": d_counts,
    }
    return new_state, metrics


def leaf_names(masks: PyTree, setup: GanSetup) -> list[str]:
    """Names ('Block_0/Conv_0/kernel') of the maskable leaves, in ``*_counts`` order."""
    return [sp.path_str(p) for p, _ in sp.maskable_leaves(masks, setup.model.is_maskable)]


def leaf_sizes(masks: PyTree, setup: GanSetup) -> list[int]:
    """Sizes of the maskable leaves, in ``*_counts`` order."""
    leaves = sp.maskable_leaves(masks, setup.model.is_maskable)
    return [int(np.prod(np.shape(m))) for _, m in leaves]
