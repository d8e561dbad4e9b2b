"""The authors' PyTorch CIFAR-10 SNGAN (their ``lottery`` model) <-> ddst_jax's ``sngan32``.

The paper's CIFAR-10 numbers come from the ``lottery`` SNGAN of the authors' code, with
``torch.nn.utils.spectral_norm`` on every layer of D. These functions turn its state dicts (and
any per-parameter arrays: masks, gradients, Adam moments) into ddst_jax's Flax variables, so a
model trained by the reference can be evaluated here and the two implementations can be compared
array by array. Everything is NumPy on the host; nothing needs PyTorch (a state dict is a
mapping from PyTorch key to array, e.g. from ``np.load`` or ``metrics.torch_weights``).

Layouts:
  * conv weights OIHW -> HWIO; linear weights (out, in) -> Dense kernels (in, out);
  * G's input linear ``l1``: PyTorch views its 16*C outputs as (C, 4, 4) (channel-major), Flax
    reshapes them to (4, 4, C), so output column ``c*16 + h*4 + w`` moves to ``(h*4 + w)*C + c``;
  * BatchNorm ``weight``/``bias`` -> ``scale``/``bias``; ``running_mean``/``running_var`` ->
    ``batch_stats`` ``mean``/``var`` (both use PyTorch's unbiased running variance, see
    ``layers.BatchNorm``); ``num_batches_tracked`` has no counterpart;
  * spectral norm: ``weight_orig`` is the raw kernel; ``weight_u`` (O,) -> ``u`` (1, O);
    ``sigma`` = u . (W v) from the stored ``weight_v`` (what a PyTorch eval-mode forward divides
    by). A train-mode forward on either side first runs one power iteration from ``u``.

Typical use::

    g_vars = generator_variables(g_state_dict)             # {"params", "batch_stats"}
    d_vars = discriminator_variables(d_state_dict)
    g_masks = generator_tree({k: m for k, m in masks.items()})   # per-parameter arrays
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

# PyTorch module name -> Flax module name, inside a block and at the top level.
_G_LAYERS = {"c1": "conv1", "c2": "conv2", "c_sc": "shortcut", "b1": "bn1", "b2": "bn2"}
_D_LAYERS = {"c1": "conv1", "c2": "conv2", "c_sc": "shortcut"}
_G_TOP = {"l1": "dense", "b5": "bn_out", "c5": "conv_out"}
_G_BLOCKS = {"block2": "block1", "block3": "block2", "block4": "block3"}
_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def _set(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    if path[-1] in tree:
        raise ValueError(f"Two PyTorch keys map to {'/'.join(path)}.")
    tree[path[-1]] = value


def _conv_or_dense(w: np.ndarray) -> np.ndarray:
    """OIHW -> HWIO for a conv weight, (out, in) -> (in, out) for a linear one."""
    w = np.asarray(w)
    return w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T


def _g_dense_kernel(w: np.ndarray, bottom_width: int) -> np.ndarray:
    """``l1.weight`` (16C, z) -> Dense kernel (z, 16C) with Flax's (h, w, c) output order."""
    out, z_dim = w.shape
    c = out // bottom_width**2
    return (np.asarray(w).reshape(c, bottom_width, bottom_width, z_dim)
            .transpose(3, 1, 2, 0).reshape(z_dim, out))


def _g_dense_bias(b: np.ndarray, bottom_width: int) -> np.ndarray:
    c = b.shape[0] // bottom_width**2
    return np.asarray(b).reshape(c, bottom_width, bottom_width).transpose(1, 2, 0).reshape(-1)


def generator_path(key: str) -> tuple[str, tuple[str, ...]]:
    """(collection, Flax path) of a ``lottery`` G state-dict key, e.g. ``block2.c1.weight`` ->
    ``('params', ('block1', 'conv1', 'kernel'))``; ``num_batches_tracked`` -> ``('', ())``.

    >>> generator_path("b5.running_var")
    ('batch_stats', ('bn_out', 'var'))
    """
    *modules, leaf = key.split(".")
    if leaf == "num_batches_tracked":
        return "", ()
    if len(modules) == 2 and modules[0] in _G_BLOCKS and modules[1] in _G_LAYERS:
        module = (_G_BLOCKS[modules[0]], _G_LAYERS[modules[1]])
        is_bn = modules[1].startswith("b")
    elif len(modules) == 1 and modules[0] in _G_TOP:
        module = (_G_TOP[modules[0]],)
        is_bn = modules[0] == "b5"
    else:
        raise ValueError(f"Unknown lottery SNGAN generator key {key!r}.")
    if is_bn:
        if leaf not in _BN:
            raise ValueError(f"Unknown BatchNorm entry {key!r}.")
        collection = "batch_stats" if leaf.startswith("running") else "params"
        return collection, (*module, _BN[leaf])
    if leaf not in ("weight", "bias"):
        raise ValueError(f"Unknown generator parameter {key!r}.")
    return "params", (*module, "kernel" if leaf == "weight" else "bias")


def discriminator_path(key: str) -> tuple[str, tuple[str, ...]]:
    """(collection, Flax path) of a ``lottery`` D (spectral-norm) state-dict key; ``weight_v``
    maps to ``('', ())`` (ddst_jax keeps sigma instead).

    >>> discriminator_path("block1.c_sc.weight_u")
    ('batch_stats', ('block1', 'shortcut_sn', 'shortcut/kernel/u'))
    """
    *modules, leaf = key.split(".")
    if len(modules) == 2 and modules[0].startswith("block") and modules[1] in _D_LAYERS:
        block, name = modules[0], _D_LAYERS[modules[1]]
        prefix: tuple[str, ...] = (block,)
    elif modules == ["l5"]:
        name, prefix = "head", ()
    else:
        raise ValueError(f"Unknown lottery SNGAN discriminator key {key!r}.")
    if leaf in ("weight_orig", "weight"):
        return "params", (*prefix, name, "kernel")
    if leaf == "bias":
        return "params", (*prefix, name, "bias")
    if leaf == "weight_u":
        return "batch_stats", (*prefix, f"{name}_sn", f"{name}/kernel/u")
    if leaf == "weight_v":
        return "", ()
    raise ValueError(f"Unknown discriminator entry {key!r}.")


def _params_tree(arrays: Mapping[str, np.ndarray], to_path, to_flax, net: str) -> dict:
    tree: dict = {}
    for key, value in arrays.items():
        collection, path = to_path(key)
        if collection != "params":
            raise ValueError(f"{key!r} is not a {net} parameter; use the *_variables function.")
        _set(tree, path, to_flax(path, np.asarray(value)))
    return tree


def generator_tree(arrays: Mapping[str, np.ndarray], *, bottom_width: int = 4) -> dict:
    """A params-like tree from arrays keyed by G *parameter* names (weights, masks, gradients,
    Adam moments...), each moved to the Flax layout of its parameter.

    >>> w = np.arange(2 * 16 * 3, dtype=np.float32).reshape(32, 3)   # l1: z 3 -> C=2 at 4x4
    >>> k = generator_tree({"l1.weight": w})["dense"]["kernel"]
    >>> k.shape, bool(k[1, 0 * 2 + 1] == w[1 * 16 + 0, 1])  # (h, w) = (0, 0), c = 1, z = 1
    ((3, 32), True)
    """
    def to_flax(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
        if path == ("dense", "kernel"):
            return _g_dense_kernel(value, bottom_width)
        if path == ("dense", "bias"):
            return _g_dense_bias(value, bottom_width)
        return _conv_or_dense(value) if path[-1] == "kernel" else value

    return _params_tree(arrays, generator_path, to_flax, "G")


def discriminator_tree(arrays: Mapping[str, np.ndarray]) -> dict:
    """A params-like tree from arrays keyed by D parameter names (``*.weight_orig``,
    ``*.bias``): weights, masks, gradients, Adam moments."""
    return _params_tree(
        arrays, discriminator_path,
        lambda path, value: _conv_or_dense(value) if path[-1] == "kernel" else value, "D")


def generator_variables(state_dict: Mapping[str, np.ndarray], *,
                        bottom_width: int = 4) -> dict:
    """``{"params", "batch_stats"}`` of ddst_jax's sngan32 G from a ``lottery`` G state dict."""
    params = {k: v for k, v in state_dict.items() if generator_path(k)[0] == "params"}
    stats: dict = {}
    for key, value in state_dict.items():
        collection, path = generator_path(key)
        if collection == "batch_stats":
            _set(stats, path, np.asarray(value, np.float32))
    return {"params": generator_tree(params, bottom_width=bottom_width), "batch_stats": stats}


def discriminator_variables(state_dict: Mapping[str, np.ndarray]) -> dict:
    """``{"params", "batch_stats"}`` of ddst_jax's sngan32 D from a ``lottery`` D state dict
    with spectral norm (``weight_orig``, ``weight_u``, ``weight_v`` per layer)."""
    params = {k: v for k, v in state_dict.items() if discriminator_path(k)[0] == "params"}
    stats: dict = {}
    for key, value in state_dict.items():
        if not key.endswith(".weight_u"):
            continue
        layer = key[: -len(".weight_u")]
        w_mat = np.asarray(state_dict[f"{layer}.weight_orig"], np.float64)
        w_mat = w_mat.reshape(w_mat.shape[0], -1)
        u = np.asarray(value, np.float64)
        v = np.asarray(state_dict[f"{layer}.weight_v"], np.float64)
        _, path = discriminator_path(key)
        _set(stats, path, np.asarray(value, np.float32)[None, :])
        sigma_path = (*path[:-1], path[-1][: -len("/u")] + "/sigma")
        _set(stats, sigma_path, np.asarray(u @ w_mat @ v, np.float32))
    return {"params": discriminator_tree(params), "batch_stats": stats}
