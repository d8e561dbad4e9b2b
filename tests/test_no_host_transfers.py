"""Issue 6: no host round trip inside or between the runner's iterations.

The runner's loop body is ``next(batches)`` -> ``iterate(state, images, labels)`` ->
``logger.add(metrics)``; metrics reach the host only at log points (``_Logger.flush``). These
tests run compiled iterations (BR measurement, G mask update and D density decision included)
inside ``no_host_transfers()``, which makes every kind of round trip raise:

* host -> device (a numpy array or Python scalar passed to the step, ``jnp.asarray(3)``, an
  index into a device array, a callback's result): ``jax.transfer_guard("disallow_explicit")``;
* callbacks compiled into the step (``jax.debug.print``, ``pure_callback``, ``io_callback``):
  ``host_ops`` finds them (and infeed/outfeed/send/recv) in the lowered program. At run time the
  guard stops them only on a single device (on a multi-device CPU mesh the callback runs
  unguarded, and a ``debug.print`` error surfaces only at the next ``effects_barrier``), so the
  static check is the one that counts;
* device -> host (``np.asarray``, ``int()``/``float()``/``bool()``, ``.tolist()``,
  ``jax.device_get``): XLA:CPU arrays live in host memory, so these are zero-copy reads that
  the transfer guard never sees on this backend (measured with jax 0.10.2: they pass under
  "disallow_explicit"). ``no_host_transfers`` therefore also trips on ``jax.Array``'s single
  host-value funnel (``ArrayImpl._value``, behind ``__array__``, the scalar conversions,
  ``tolist`` and ``device_get``) and on ``copy_to_host_async``.

``test_guard_catches_every_kind_of_round_trip`` shows each of these raising, so a round trip
added to the step or to the loop fails ``test_iterations_make_no_host_round_trip``.
"""

import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import array as jax_array
from jax.experimental import io_callback
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddst_jax import control, data, train
from experiments.configs import cifar10 as cifar10_config

# t = 1..6 from pre-placed batches, then t = 7, 8 from the runner's prefetching BatchIterator:
# BR at even t, G mask updates at t = 2, 4, 6, D decisions at t = 4 and 6 (8 is the last).
ITERATIONS = 6
NUM_DEVICES = 2  # A real 'data' mesh: a mis-sharded input would need an implicit reshard.

# Ops that move data between the program and the host: Python callbacks (CPU/GPU/TPU custom
# call targets all contain "callback"), infeed/outfeed and host send/recv.
_HOST_OP = re.compile(r"callback|infeed|outfeed|stablehlo\.send|stablehlo\.recv")


class HostTransferError(AssertionError):
    """A device -> host read of a ``jax.Array`` under ``no_host_transfers``."""


@contextlib.contextmanager
def no_host_transfers():
    """Every host <-> device transfer in this block raises (see the module docstring)."""

    def trip(*args, **kwargs):
        raise HostTransferError("device -> host read of a jax.Array inside the guarded loop")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jax_array.ArrayImpl, "_value", property(trip))
        mp.setattr(jax_array.ArrayImpl, "copy_to_host_async", trip)
        with jax.transfer_guard("disallow_explicit"):
            yield


def host_ops(lowered) -> list[str]:
    """Lines of a lowered program that call back into / exchange data with the host."""
    return [line.strip() for line in lowered.as_text().splitlines() if _HOST_OP.search(line)]


def _config(method):
    c = cifar10_config.get_config("smoke")
    c.model.g_ch = c.model.d_ch = 8
    c.data.source, c.data.synthetic_size, c.data.prefetch = "synthetic", 64, 0
    c.train.iterations, c.train.n_dis = 8, 1  # one D step: compile time (tests are cold)
    c.train.batch_size_g = c.train.batch_size_d = 8
    c.train.progress_bar = False
    c.sparsity.method = method
    c.sparsity.g_density = 0.3
    c.sparsity.g_update_every = 2
    c.balance.br_every, c.balance.window = 2, 4  # 2 entries: full after the t = 4 measurement
    c.control.d_update_every = 2
    # A band far above any BR, so every ADAPT decision is a PRUNE (a real resize of D's masks).
    c.control.band_low, c.control.band_high = 5.0, 6.0
    c.parallel.num_devices = NUM_DEVICES
    return c


def _build(method):
    """Setup, jitted iteration, initial state, device batches and the runner's BatchIterator.

    Built as ``train_and_evaluate`` builds them; the batches of t = 1..6 are put on the mesh
    with the iteration's input sharding, the iterator serves t = 7, 8.
    """
    config = _config(method)
    spec = train.validate_config(config)
    setup = train.build_setup(config, spec)
    mesh = train.make_mesh(config.parallel.num_devices)
    init_fn, iterate, _ = train.compile_fns(setup, config, mesh)
    state = init_fn(jax.random.key(config.seed))
    source = data.load_source(config.data, seed=config.seed)
    n, b = config.train.n_dis, config.train.batch_size_d
    batch_sharding = NamedSharding(mesh, P(None, "data"))  # compile_fns' in_shardings
    batches = [jax.device_put(data.get_stacked_batch(source, i * n, b, n, seed=config.seed),
                              batch_sharding) for i in range(ITERATIONS)]
    prefetched = data.BatchIterator(source, ITERATIONS * n, b, seed=config.seed,
                                    flip=config.data.flip, stack=n, prefetch=2, mesh=mesh)
    return setup, iterate, state, batches, prefetched


@pytest.mark.parametrize("method", ["sdst", "adapt"])
def test_iterations_make_no_host_round_trip(method):
    setup, iterate, state, batches, prefetched = _build(method)
    # Nothing in the compiled iteration calls back into the host.
    assert host_ops(iterate.lower(state, batches[0]["image"], batches[0]["label"])) == []
    g_masks0 = jax.device_get(state.g_masks)
    d_masks0 = jax.device_get(state.d_masks)
    metrics = []
    with prefetched, no_host_transfers():
        for batch in batches:  # the runner's loop body (logger.add only appends)
            state, m = iterate(state, batch["image"], batch["label"])
            metrics.append(m)
        # The runner's own input path: BatchIterator puts batches on the mesh from its
        # background thread, so the loop's next() hands over device arrays (t = 7, 8).
        for _ in range(2):
            _, batch = next(prefetched)
            state, m = iterate(state, batch["image"], batch["label"])
            metrics.append(m)
    host = jax.device_get(metrics)
    assert int(state.step) == ITERATIONS + 2
    # The guarded iterations did the scheduled work: BR at even t only ...
    measured = [t for t, m in enumerate(host, 1) if np.isfinite(m["br/ratio"])]
    assert measured == [2, 4, 6, 8]
    assert [bool(m["br/window_full"]) for m in host] == [False] * 3 + [True] * 5
    # ... G's masks updated (same total, new layout) ...
    g_changed = [bool((a != b).any()) for a, b in zip(jax.tree_util.tree_leaves(g_masks0),
                                                     jax.tree_util.tree_leaves(state.g_masks),
                                                     strict=True)]
    assert any(g_changed)
    assert len({int(m["g_counts"].sum()) for m in host}) == 1
    # ... and ADAPT decided D's density at t = 4 and 6 (PRUNE: BR below the band).
    actions = [int(m["control/action"]) for m in host]
    d_totals = [int(m["d_counts"].sum()) for m in host]
    if method == "adapt":
        # (t = 8 is the run's last iteration: no decision there.)
        assert actions == [control.NONE] * 3 + [control.PRUNE, control.NONE, control.PRUNE] + \
            [control.NONE] * 2
        assert d_totals[2] > d_totals[3] > d_totals[5]
    else:
        assert actions == [control.NONE] * len(host)
        assert jax.tree_util.tree_all(jax.tree_util.tree_map(
            np.array_equal, d_masks0, jax.device_get(state.d_masks)))


def test_guard_catches_every_kind_of_round_trip():
    mesh = train.make_mesh(NUM_DEVICES)
    x = jax.device_put(jnp.arange(8.0), NamedSharding(mesh, P("data")))
    step = jax.jit(lambda v: v * 2)
    printing = jax.jit(lambda v: (jax.debug.print("{}", v[0]), v * 2)[1])
    calling = jax.jit(lambda v: jax.pure_callback(
        lambda a: np.asarray(a) * 2, jax.ShapeDtypeStruct(v.shape, v.dtype), v))
    io = jax.jit(lambda v: io_callback(lambda a: a, jax.ShapeDtypeStruct((), v.dtype), v[0]))
    x1 = jax.device_put(jnp.arange(8.0), jax.devices()[0])  # see the callbacks below
    jax.block_until_ready([step(x), printing(x), calling(x), io(x), calling(x1), io(x1)])
    round_trips = {
        "numpy argument": lambda: step(np.ones(8, np.float32)),
        "python scalar argument": lambda: step(1.0),
        "jnp.asarray of a host value": lambda: jnp.asarray(3),
        "jax.device_get": lambda: jax.device_get(step(x)),
        "np.asarray": lambda: np.asarray(step(x)),
        "int()": lambda: int(step(x).sum()),
        "float()": lambda: float(step(x).sum()),
        "bool()": lambda: bool(step(x).sum() > 0),
        ".tolist()": lambda: step(x).tolist(),
        "copy_to_host_async": lambda: step(x).copy_to_host_async(),
        # At run time the guard stops a callback's transfer only on one device (on a 2-device
        # CPU mesh the callback runs unguarded); host_ops below catches them on any mesh.
        "pure_callback in the step": lambda: jax.block_until_ready(calling(x1)),
        "io_callback in the step": lambda: jax.block_until_ready(io(x1)),
    }
    for name, fn in round_trips.items():
        try:
            with no_host_transfers():
                fn()
        except HostTransferError:
            pass
        except (jax.errors.JaxRuntimeError, ValueError) as e:  # the guard, or a failed callback
            assert re.search(r"Disallowed .* transfer|[Cc]allback error", str(e)), (name, e)
        else:
            pytest.fail(f"{name}: no error under no_host_transfers()")
    # A step that stays on device passes, and the guard is lifted afterwards.
    with no_host_transfers():
        y = jax.block_until_ready(step(step(x)))
    assert np.asarray(y).tolist() == [4.0 * i for i in range(8)]
    # The static check flags every kind of callback in a lowered step, and only those; it is
    # what catches jax.debug.print, whose run-time error surfaces only at the next
    # jax.effects_barrier() (and would then leak into the rest of the session).
    assert host_ops(step.lower(x)) == []
    for fn in (printing, calling, io):
        assert host_ops(fn.lower(x)) and host_ops(fn.lower(x1)), fn
