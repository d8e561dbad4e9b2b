"""Training FLOPs of sparse GANs, counted the way the paper counts them (docs/method.md section 8).

Three layers of accounting, each a small function:

1. ``layer_flops(module, *example_args)``: per-sample forward FLOPs of every ``nn.Dense``,
   ``nn.Conv``, ``nn.ConvTranspose`` and ``nn.BatchNorm`` call of a Flax linen model (also when
   wrapped by ``nn.SpectralNorm``), found by intercepting those calls during an abstract forward
   (``jax.eval_shape``: nothing is allocated, no tables are written by hand).
2. ``forward_flops(layers, densities)``: one sample's forward FLOPs at given per-layer densities.
   Only the weight term of a layer scales with its density; bias and BN terms stay dense.
3. ``training_flops(g_layers, d_layers, ...)``: whole-run totals of G and D from the per-sample
   numbers, the samples per iteration and the mask intervals of a run, in the paper's convention
   or a physically correct one.

Counting rules per sample (docs/method.md section 8; multiply-accumulates, one FLOP each):
  - dense ``in * out`` (+ ``out`` with bias), per output vector;
  - conv ``c_in * c_out * k_h * k_w * H_out * W_out / groups`` (+ ``c_out * H_out * W_out`` with
    bias);
  - transposed conv ``c_in * c_out * k_h * k_w * H_in * W_in`` (+ ``c_out * H_out * W_out`` with
    bias): every *input* position scatters one kernel, so counting output positions would
    over-count by ``stride**2`` (the public code does not count transposed convs at all; none of
    the paper's models uses one);
  - batch norm ``C * H * W`` for its scale plus the same for its offset (``2 * C`` for 1-D
    inputs); a BN without scale/offset (as inside conditional BN, whose gains come from other
    layers) counts 0;
  - activations, pooling, upsampling, attention products and embeddings are not counted.

Density log file (``RUN_DIR/density_log.jsonl``), written by the training runner, read by
``read_density_log``; ``density_log_row`` formats one line. One JSON object per line, written at
the start of the run (iteration 0) and after every iteration in which a mask changed::

    {"iteration": 500, "g": {"Block_0/Conv_0/kernel": 0.18, ...},
     "d": {"Block_0/Conv_0/kernel": 0.1, ...}, "changed": ["g"]}

  - ``iteration``: the number of completed iterations when the densities took effect (0 for the
    initial masks; ``t`` for a mask changed at the end of iteration ``t``).
  - ``g``, ``d``: per-leaf densities (active / total, in [0, 1]) of G and D, keyed by the key path
    of the leaf in the params tree, joined by ``/``. Leaves missing from the map count as dense.
  - ``changed`` (optional): which masks changed at this row. When it is absent, a network counts
    as changed iff its densities differ from the previous row. Only a layer-scope D drop-and-grow
    (strict setting, at the cap) needs it: it keeps every per-layer density, yet the paper
    convention counts it as a new D interval. (A dynamic G's intervals follow its update
    schedule, see ``scheduled_log``.)
  - Other keys (``ddst_jax.train`` adds ``step``, ``g_counts``, ``d_counts``) are ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import numpy as np

from ddst_jax import storage

Path = tuple[str, ...]
#: Per-leaf densities: a mapping ``path -> density`` (tuple keys or ``'a/b/kernel'`` strings) or a
#: nested mapping like the params tree whose leaves are densities, or masks (their mean is used).
Densities = Mapping[Any, Any]
#: A run's densities over time: ``None`` (dense), one ``Densities`` (fixed masks), or a sequence
#: of ``(iteration, Densities)`` mask changes, first at iteration 0.
DensityLog = Densities | Sequence[tuple[int, Densities | None]] | None
Convention = Literal["paper", "physical"]

_CONVENTIONS = ("paper", "physical")


@dataclasses.dataclass(frozen=True)
class LayerFlops:
    """Per-sample forward FLOPs of one call of a counted layer.

    Attributes:
      path: key path of the layer's ``kernel`` in the params tree, e.g.
        ``('Block_0', 'Conv_0', 'kernel')``; for a batch norm (no kernel) the module's path.
      weight_flops: FLOPs of the kernel product; scaled by the kernel's density when masked.
      other_flops: FLOPs of the bias add and the BN affine; never scaled.
      kind: ``'dense'``, ``'conv'``, ``'conv_transpose'`` or ``'batch_norm'``.
      in_shape: shape of the layer's input as traced (batch dimension included).
      out_shape: shape of the layer's output as traced (batch dimension included).
    """

    path: Path
    weight_flops: int
    other_flops: int
    kind: str = ""
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()


# --------------------------------------------------------------------------------------------
# Per-layer forward FLOPs
# --------------------------------------------------------------------------------------------


def _kind(module: nn.Module) -> str | None:
    # ConvLocal is not a subclass of nn.Conv (unshared kernels): it is deliberately not counted.
    if isinstance(module, nn.Dense):
        return "dense"
    if isinstance(module, nn.Conv):
        return "conv"
    if isinstance(module, nn.ConvTranspose):
        return "conv_transpose"
    if isinstance(module, nn.BatchNorm):
        return "batch_norm"
    return None


def _count_call(kind: str, module: nn.Module, x: Any, y: Any) -> LayerFlops:
    """FLOPs of one call over the whole traced batch (``layer_flops`` divides by the batch)."""
    path = tuple(str(p) for p in module.path)
    shapes = {"kind": kind, "in_shape": tuple(x.shape), "out_shape": tuple(y.shape)}
    if kind == "batch_norm":
        n_affine = int(bool(module.use_scale)) + int(bool(module.use_bias))
        return LayerFlops(path, 0, n_affine * math.prod(y.shape), **shapes)
    # Under nn.SpectralNorm the wrapped layer sees its normalised kernel: same shape, same path.
    kernel_size = math.prod(np.shape(module.get_variable("params", "kernel")))
    if kind == "conv_transpose":
        positions = math.prod(x.shape) // x.shape[-1]  # input positions, batch included
    else:
        positions = math.prod(y.shape) // y.shape[-1]  # output positions, batch included
    bias = math.prod(y.shape) if module.use_bias else 0
    return LayerFlops((*path, "kernel"), kernel_size * positions, bias, **shapes)


def _first_leaf(args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    leaves = jax.tree_util.tree_leaves((tuple(args), dict(kwargs)))
    return leaves[0] if leaves else None


def _is_array_tree(tree: Any) -> bool:
    leaves = jax.tree_util.tree_leaves(tree)
    return bool(leaves) and all(hasattr(x, "shape") and hasattr(x, "dtype") for x in leaves)


def _check_kernel_leaf(call: LayerFlops, module: nn.Module, params: Any) -> None:
    """The kernel a layer uses must be the params leaf at its path, so densities can match."""
    seen = tuple(np.shape(module.get_variable("params", "kernel")))
    leaf = _leaf_at(params, call.path)
    if leaf is None or tuple(np.shape(leaf)) != seen:
        raise ValueError(
            f"The {call.kind} layer at {call.path[:-1]} uses a kernel of shape {seen}, but the "
            f"params tree holds {'no leaf' if leaf is None else np.shape(leaf)} at {call.path}: "
            "per-leaf densities could not be matched to it. Layers inside lifted transforms "
            "(nn.scan, nn.vmap) are not supported; call them outside such transforms."
        )


def _leaf_at(tree: Any, path: Path) -> Any:
    node = tree
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def layer_flops(
    module: nn.Module,
    *example_args: Any,
    method: Callable[..., Any] | str | None = None,
    rngs: Mapping[str, jax.Array] | None = None,
    **kwargs: Any,
) -> list[LayerFlops]:
    """Per-sample forward FLOPs of every counted layer call of ``module`` (docs/method.md 8).

    The model is initialised and applied under ``jax.eval_shape``, so only shapes are traced.
    Calls are recorded in execution order; a layer called twice appears twice.

    Args:
      module: an unbound Flax linen module.
      *example_args: the forward's positional inputs (arrays or ``jax.ShapeDtypeStruct``s); the
        leading axis of the first one is the batch, of any size; results are per sample.
      method: the method to trace (default ``__call__``), as for ``module.apply``.
      rngs: PRNG keys for ``init`` (default: a ``'params'`` key); other streams a model draws
        from in its forward (e.g. ``'dropout'``) must be given here.
      **kwargs: keyword inputs of the forward, e.g. ``train=True``.

    Returns:
      One ``LayerFlops`` per call of ``nn.Dense``, ``nn.Conv``, ``nn.ConvTranspose`` or
      ``nn.BatchNorm``, FLOPs per sample.

    Raises:
      ValueError: no batched example input, a layer whose FLOPs are not a multiple of the batch,
        or a layer whose kernel is not at its module path in the params tree (layers inside
        ``nn.scan``/``nn.vmap`` are not supported).
    """
    first = _first_leaf(example_args, {})
    if first is None or np.ndim(first) == 0:
        raise ValueError(
            "layer_flops needs a batched example input (leading axis = batch), e.g. "
            "jax.ShapeDtypeStruct((1, 128), jnp.float32); got none or a scalar."
        )
    batch = int(np.shape(first)[0])
    if batch < 1:
        raise ValueError(f"The example batch is empty (shape {np.shape(first)}); use batch >= 1.")
    rngs = dict(rngs) if rngs is not None else {"params": jax.random.key(0)}

    # Array inputs are traced; flags such as train=True must stay Python values.
    array_kwargs = {k: v for k, v in kwargs.items() if _is_array_tree(v)}
    static_kwargs = {k: v for k, v in kwargs.items() if k not in array_kwargs}

    # Init runs a spectral-normalised layer twice (map_variables' init pass), so only the apply
    # below is intercepted: there every layer call happens exactly once per forward.
    variables = jax.eval_shape(
        lambda r, a, k: module.init(r, *a, method=method, **k, **static_kwargs),
        rngs, example_args, array_kwargs,
    )

    params = variables.get("params", {})
    calls: list[LayerFlops] = []

    def interceptor(next_fun, args, call_kwargs, context):
        out = next_fun(*args, **call_kwargs)
        kind = _kind(context.module)
        if context.method_name == "__call__" and kind is not None:
            x = args[0] if args else next(iter(call_kwargs.values()))
            call = _count_call(kind, context.module, x, out)
            if kind != "batch_norm":
                _check_kernel_leaf(call, context.module, params)
            calls.append(call)
        return out

    def forward(v, r, a, k):
        # mutable=True: BN statistics and spectral-norm state update in a training forward.
        return module.apply(v, *a, method=method, rngs=r, mutable=True, **k, **static_kwargs)

    with nn.intercept_methods(interceptor):
        jax.eval_shape(forward, variables, rngs, example_args, array_kwargs)

    layers = []
    for call in calls:
        if call.weight_flops % batch or call.other_flops % batch:
            raise ValueError(
                f"FLOPs of {call.path} ({call.weight_flops} + {call.other_flops}) are not a "
                f"multiple of the batch {batch}: the leading axis of the first example input "
                "must be the batch axis."
            )
        layers.append(
            dataclasses.replace(
                call, weight_flops=call.weight_flops // batch, other_flops=call.other_flops // batch
            )
        )
    return layers


# --------------------------------------------------------------------------------------------
# Densities
# --------------------------------------------------------------------------------------------


def _split_key(key: Any) -> Path:
    if isinstance(key, tuple):
        return tuple(str(k) for k in key)
    return tuple(str(key).split("/"))


def flatten_densities(densities: Densities | None) -> dict[Path, float]:
    """Per-leaf densities as ``{path: density}``.

    Accepts a mapping with tuple keys, ``'a/b/kernel'`` string keys, or nested mappings like a
    params tree (also mixtures, e.g. a density-log row). A leaf is a density in [0, 1] or a mask
    array, whose mean is its density.

    >>> flatten_densities({'Block_0': {'Conv_0': {'kernel': 0.5}}, 'Dense_0/kernel': 0.25})
    {('Block_0', 'Conv_0', 'kernel'): 0.5, ('Dense_0', 'kernel'): 0.25}
    """
    flat: dict[Path, float] = {}

    def walk(node: Mapping[Any, Any], prefix: Path) -> None:
        for key, value in node.items():
            path = prefix + _split_key(key)
            if isinstance(value, Mapping):
                walk(value, path)
                continue
            d = float(np.mean(np.asarray(value, dtype=np.float64)))
            if not 0.0 <= d <= 1.0:
                raise ValueError(f"Density of {'/'.join(path)} is {d}; densities lie in [0, 1].")
            flat[path] = d

    if densities is not None:
        if not isinstance(densities, Mapping):
            raise TypeError(
                "Densities must be a mapping (path -> density, or nested like the params tree); "
                f"got {type(densities).__name__}."
            )
        walk(densities, ())
    return flat


def forward_flops(layers: Sequence[LayerFlops], densities: Densities | None = None) -> float:
    """Forward FLOPs of one sample at the given per-leaf densities.

    Args:
      layers: output of ``layer_flops``.
      densities: per-leaf densities (see ``flatten_densities``); ``None`` is dense. Layers whose
        kernel has no entry count as dense.

    Returns:
      ``sum(weight_flops * density + other_flops)`` over the layers, in FLOPs per sample.

    Raises:
      ValueError: an entry below 1 names no counted layer (it would be silently ignored): e.g.
        the full ``variables`` were passed instead of ``variables['params']``.
    """
    flat = flatten_densities(densities)
    counted = {layer.path for layer in layers if layer.weight_flops}
    stray = sorted("/".join(p) for p, d in flat.items() if d < 1.0 and p not in counted)
    if stray:
        raise ValueError(
            f"Densities given for {stray[:3]}{' ...' if len(stray) > 3 else ''} match no counted "
            "layer. Keys must be params-tree paths of Dense/Conv kernels as in layer_flops (pass "
            "variables['params']-like trees, not the full variables)."
        )
    return float(sum(layer.weight_flops * flat.get(layer.path, 1.0) + layer.other_flops
                     for layer in layers))


# --------------------------------------------------------------------------------------------
# Training totals
# --------------------------------------------------------------------------------------------


def samples_per_iteration(n_dis: int, batch_g: int, batch_d: int) -> tuple[int, int]:
    """Forward-equivalent samples per iteration of G and of D (docs/method.md section 8).

    G: ``n_dis * B_D`` fakes generated for the D steps plus ``3 * B_G`` for its own step (forward
    and a backward counted as two forwards). D: ``3 * n_dis * B_D`` in its steps plus ``B_G`` in
    G's step.

    >>> samples_per_iteration(5, 128, 64)
    (704, 1088)
    """
    return n_dis * batch_d + 3 * batch_g, 3 * n_dis * batch_d + batch_g


def _as_log(log: DensityLog, name: str, iterations: int) -> list[tuple[int, Densities | None]]:
    if log is None or isinstance(log, Mapping):
        return [(0, log)]
    entries = [(int(it), dens) for it, dens in log]
    if not entries or entries[0][0] != 0:
        raise ValueError(f"{name} must start with the initial densities at iteration 0.")
    its = [it for it, _ in entries]
    if any(b <= a for a, b in zip(its, its[1:], strict=False)) or its[-1] >= iterations:
        raise ValueError(
            f"{name} iterations must increase strictly and stay below iterations={iterations}; "
            f"got {its[:5]}{' ...' if len(its) > 5 else ''}."
        )
    return entries


def scheduled_log(
    log: Sequence[tuple[int, Densities | None]], every: int, iterations: int
) -> list[tuple[int, Densities | None]]:
    """A density log with one entry per scheduled mask update, as the paper counts a G.

    A dynamic G updates its mask every ``every`` iterations (never at the final one) and the
    public code opens a new ``every``-long interval at each update, even when no per-layer
    density moved (a layer-scope update, or a run log that only records changed densities).
    This samples the piecewise-constant ``log`` at ``0, every, 2 * every, ... < iterations``.

    >>> scheduled_log([(0, {'k': 1.0}), (4, {'k': 0.5})], every=2, iterations=7)
    [(0, {'k': 1.0}), (2, {'k': 1.0}), (4, {'k': 0.5}), (6, {'k': 0.5})]
    """
    entries = _as_log(log, "log", iterations)
    if every < 1:
        raise ValueError(f"The update interval must be >= 1 iteration; got {every}.")
    out, i = [], 0
    for start in range(0, iterations, every):
        while i + 1 < len(entries) and entries[i + 1][0] <= start:
            i += 1
        out.append((start, entries[i][1]))
    return out


def _interval_lengths(
    starts: Sequence[int],
    *,
    iterations: int,
    update_every: int | None,
    steps_per_iteration: int,
    convention: Convention,
    name: str,
) -> list[int]:
    """Length of each mask interval: iterations for G, D steps (paper) or iterations for D."""
    if update_every is None and len(starts) > 1:
        raise ValueError(
            f"{name} has {len(starts)} entries but its update interval is None (a static mask); "
            "give the mask-update interval in iterations for a dynamic mask."
        )
    if update_every is not None and update_every < 1:
        raise ValueError(f"The {name} update interval must be >= 1 iteration; got {update_every}.")
    if convention == "paper":
        length = iterations if update_every is None else update_every
        return [length * steps_per_iteration] * len(starts)
    return [b - a for a, b in zip(starts, [*starts[1:], iterations], strict=True)]


def _network_total(
    layers: Sequence[LayerFlops],
    log: list[tuple[int, Densities | None]],
    lengths: Sequence[int],
    samples: int,
) -> tuple[float, float]:
    sparse = sum(forward_flops(layers, dens) * n for (_, dens), n in zip(log, lengths, strict=True))
    dense = forward_flops(layers) * sum(lengths)
    return samples * sparse, samples * dense


def training_flops(
    g_layers: Sequence[LayerFlops],
    d_layers: Sequence[LayerFlops],
    *,
    iterations: int,
    n_dis: int,
    batch_g: int,
    batch_d: int,
    g_density_log: DensityLog = None,
    d_density_log: DensityLog = None,
    g_update_every: int | None = None,
    d_update_every: int | None = None,
    convention: Convention = "paper",
) -> dict[str, float]:
    """Training FLOPs of a GAN run from per-sample layer FLOPs and the run's mask intervals.

    With ``F_G(d)``, ``F_D(d)`` the per-sample forward FLOPs at densities ``d``
    (``forward_flops``) and ``S_G = n_dis * B_D + 3 * B_G``, ``S_D = 3 * n_dis * B_D + B_G``
    (``samples_per_iteration``), each log entry ``i`` opens a mask interval and

        G = S_G * sum_i F_G(d_i) * L_G,i        D = S_D * sum_j F_D(d_j) * L_D,j

    ``convention="paper"`` (the public code, so the paper's tables are reproduced):
      - ``L_G,i = g_update_every`` iterations for a dynamic G (one interval from the start, one
        after each mask change), ``iterations`` for a static G;
      - ``L_D,j = d_update_every * n_dis`` *D steps* for a dynamic D, ``iterations * n_dis`` for a
        static D. ``S_D`` already holds the ``n_dis`` D steps of an iteration, so D is counted
        ``n_dis`` times over: paper D = ``n_dis`` * physical D for logs that change exactly
        every update interval. A dynamic D decision that leaves the mask unchanged writes no
        entry and so, as in the public code, adds no interval.
      So each entry must be one mask update: pass a dynamic G's log through ``scheduled_log``
      when it may skip updates that left every per-layer density unchanged.
    ``convention="physical"``: every interval lasts from its entry's iteration to the next entry
    (the last to ``iterations``), in iterations, for G and D alike. The samples per iteration
    are docs/method.md section 8's in both conventions.

    Not counted: mask updates, BR forwards, EMA, evaluation.

    Args:
      g_layers, d_layers: ``layer_flops`` of G (input z) and D (input: a real-size image).
      iterations: training iterations (one = ``n_dis`` D steps + one G step).
      n_dis: D steps per iteration.
      batch_g, batch_d: batch sizes ``B_G`` and ``B_D``.
      g_density_log, d_density_log: ``None`` (dense), one ``Densities`` (a static mask), or a
        list of ``(iteration, Densities)`` in effect from that iteration on, first at 0.
      g_update_every, d_update_every: mask-update intervals in iterations (``dT_G``, ``dT_D``)
        of a dynamic network; ``None`` for a static (or dense) one.
      convention: ``"paper"`` or ``"physical"``.

    Returns:
      FLOPs: ``g``, ``d``, ``total`` (sparse run), ``dense_g``, ``dense_d``, ``dense_total`` (the
      same intervals at density 1; the dense run's total whenever the intervals cover the run,
      as in the public code), and ``normalised_percent = 100 * total / dense_total``.
    """
    if convention not in _CONVENTIONS:
        raise ValueError(f"Unknown convention {convention!r}; use one of {_CONVENTIONS}.")
    counts = {"iterations": iterations, "n_dis": n_dis, "batch_g": batch_g, "batch_d": batch_d}
    for name, value in counts.items():
        if not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    s_g, s_d = samples_per_iteration(n_dis, batch_g, batch_d)
    g_log = _as_log(g_density_log, "g_density_log", iterations)
    d_log = _as_log(d_density_log, "d_density_log", iterations)
    g_len = _interval_lengths(
        [it for it, _ in g_log], iterations=iterations, update_every=g_update_every,
        steps_per_iteration=1, convention=convention, name="g_density_log",
    )
    d_len = _interval_lengths(
        [it for it, _ in d_log], iterations=iterations, update_every=d_update_every,
        steps_per_iteration=n_dis if convention == "paper" else 1, convention=convention,
        name="d_density_log",
    )
    g, dense_g = _network_total(g_layers, g_log, g_len, s_g)
    d, dense_d = _network_total(d_layers, d_log, d_len, s_d)
    total, dense_total = g + d, dense_g + dense_d
    return {
        "g": g,
        "d": d,
        "total": total,
        "dense_g": dense_g,
        "dense_d": dense_d,
        "dense_total": dense_total,
        "normalised_percent": 100.0 * total / dense_total if dense_total else float("nan"),
    }


# --------------------------------------------------------------------------------------------
# Density log file
# --------------------------------------------------------------------------------------------

DENSITY_LOG_FILE = "density_log.jsonl"


def density_log_row(
    iteration: int,
    g: Densities,
    d: Densities,
    changed: Sequence[str] = ("g", "d"),
    extra: Mapping[str, Any] | None = None,
) -> str:
    """One line of ``density_log.jsonl`` (no trailing newline); see the module docstring.

    ``extra`` adds fields after the standard ones (the runner adds ``step`` and raw counts);
    readers ignore them. It may not replace a standard field.

    >>> density_log_row(0, {'Dense_0': {'kernel': 0.5}}, {}, changed=['g'])
    '{"iteration": 0, "g": {"Dense_0/kernel": 0.5}, "d": {}, "changed": ["g"]}'
    """
    bad = [c for c in changed if c not in ("g", "d")]
    if bad:
        raise ValueError(f"`changed` names networks 'g' and/or 'd'; got {bad}.")

    def joined(dens: Densities) -> dict[str, float]:
        return {"/".join(p): d for p, d in flatten_densities(dens).items()}

    row = {"iteration": int(iteration), "g": joined(g), "d": joined(d), "changed": list(changed)}
    clash = sorted(set(extra or {}) & set(row))
    if clash:
        raise ValueError(f"`extra` may not replace the standard fields {clash}.")
    return json.dumps({**row, **(extra or {})})


def read_density_log(
    path: str | os.PathLike[str],
) -> tuple[list[tuple[int, dict[Path, float]]], list[tuple[int, dict[Path, float]]]]:
    """The G and D density logs of a run, ready for ``training_flops``.

    Args:
      path: a ``density_log.jsonl`` file, or the run directory holding one.

    Returns:
      ``(g_log, d_log)``: each a list of ``(iteration, {path: density})``, one entry per mask
      change of that network (the first at iteration 0).
    """
    path = os.fspath(path)
    if storage.isdir(path):
        path = storage.join(path, DENSITY_LOG_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(
            f"No density log at {path}; the training runner writes {DENSITY_LOG_FILE} into the "
            "run directory (format in the ddst_jax.metrics.flops docstring)."
        )
    logs: dict[str, list[tuple[int, dict[Path, float]]]] = {"g": [], "d": []}
    for line_no, line in enumerate(storage.read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            iteration = int(row["iteration"])
            dens = {net: flatten_densities(row[net]) for net in ("g", "d")}
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{path}:{line_no}: not a density-log row {{'iteration', 'g', 'd'}} ({e})."
            ) from e
        changed = row.get("changed")
        for net in ("g", "d"):
            log = logs[net]
            is_change = net in changed if changed is not None else (
                not log or log[-1][1] != dens[net]
            )
            if not log or is_change:
                log.append((iteration, dens[net]))
    if not logs["g"]:
        raise ValueError(f"{path} holds no rows.")
    return logs["g"], logs["d"]
