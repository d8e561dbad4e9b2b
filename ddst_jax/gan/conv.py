"""Convolutions whose CPU gradients are plain matrix products (same maths as ``lax.conv``).

Profiling the full-size SNGAN G step on XLA:CPU (jax 0.10, YNNPACK convolutions) showed where
its time went: the weight gradient of a 3x3 convolution cost about twice its forward pass, and a
1x1 convolution ran 3-7x slower than the matrix product it is. PyTorch's CPU kernels do not have
that gap, and it was most of our G step's deficit (numbers in BUILD_NOTES.md, "Performance").

``conv_general_dilated`` is a drop-in for ``lax.conv_general_dilated`` (pass it to ``nn.Conv``,
or ``conv_fn(impl)`` to choose the implementation) that, for the stride-1, undilated, ungrouped
NHWC/HWIO convolutions the GAN models use:

* computes a 1x1 convolution as a matrix product (forward and both gradients are GEMMs);
* computes a k x k "SAME" convolution with ``lax.conv`` forward and input gradient, and its
  weight gradient as k*k GEMMs, one per tap:
  dW[i, j] = sum over b, h, w of x_pad[b, h+i, w+j]^T dy[b, h, w].

Anything else (strides, dilation, groups, other layouts or paddings) goes to
``lax.conv_general_dilated`` unchanged. ``impl="auto"`` (what the models use) takes the rewrite
where it pays, on a single CPU device; GPUs, TPUs and multi-device meshes keep the native
convolution kernels. ``"xla"`` and
``"gemm"`` force a choice; ``auto_impl`` re-points "auto" while a function is traced, which is how
``benchmarks/gan_steps.py`` compares the two on the same models.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

ConvImpl = Literal["auto", "xla", "gemm"]
CONV_IMPLS = ("auto", "xla", "gemm")
_NHWC = ("NHWC", "HWIO", "NHWC")
_AUTO = contextvars.ContextVar("ddst_jax_conv_auto_impl", default=None)


@contextlib.contextmanager
def auto_impl(impl: ConvImpl) -> Iterator[None]:
    """Within the block, "auto" resolves to ``impl`` for functions traced there.

    Read at trace time, and jit reuses the trace of a function object it has seen, so jit a
    fresh function (e.g. a new lambda) inside the block.

    >>> with auto_impl("xla"):
    ...     resolve_impl("auto")
    'xla'
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"Unknown convolution implementation {impl!r}; use one of {CONV_IMPLS}.")
    token = _AUTO.set(impl)
    try:
        yield
    finally:
        _AUTO.reset(token)


def resolve_impl(impl: str) -> str:
    """"xla" or "gemm" for ``impl``; "auto" is "gemm" on a single CPU device, else "xla"
    (unless re-pointed by ``auto_impl``).

    >>> resolve_impl("xla")
    'xla'
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"Unknown convolution implementation {impl!r}; use one of {CONV_IMPLS}.")
    if impl == "auto":
        impl = _AUTO.get() or "auto"
    if impl == "auto":
        # One CPU device only. With the tap GEMMs a tiny 8-iteration run on 2 processes x 4
        # devices and one on 1 process x 8 devices differed by 34 mask entries and 5e-3 in
        # their images, where with lax.conv they agree to 3e-6 (most likely the partitioned
        # contraction over the batch-sharded axis reduces in a different order; not traced).
        # Multi-device CPU meshes are for tests, not speed, so they keep lax.conv.
        return "gemm" if jax.default_backend() == "cpu" and jax.device_count() == 1 else "xla"
    return impl


def _xla_conv(x: jax.Array, w: jax.Array, precision=None) -> jax.Array:
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_NHWC,
                                    precision=precision)


def _tap_weight_grad(x: jax.Array, dy: jax.Array, k: int, precision=None) -> jax.Array:
    """dL/dW of a stride-1 SAME k x k NHWC convolution: (k, k, C_in, C_out), as k*k GEMMs.

    x: (B, H, W, C_in) the convolution's input; dy: (B, H, W, C_out) the output's cotangent.
    """
    pad = k // 2
    height, width, c_in = x.shape[1:]
    x_pad = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy_2d = dy.reshape(-1, dy.shape[-1])
    taps = []
    for i in range(k):
        for j in range(k):
            # The barrier makes XLA materialise the shifted tap as a plain (B*H*W, C_in) matrix:
            # fused into the dot it makes XLA:CPU leave the fast GEMM path (measured 1.4x slower).
            shifted = lax.optimization_barrier(x_pad[:, i:i + height, j:j + width, :])
            taps.append(jnp.dot(shifted.reshape(-1, c_in).T, dy_2d, precision=precision,
                                preferred_element_type=jnp.float32))
    return jnp.stack(taps).reshape(k, k, c_in, -1)


@jax.custom_vjp
def _conv_same_taps(x: jax.Array, w: jax.Array) -> jax.Array:
    return _xla_conv(x, w)


def _conv_same_taps_fwd(x, w):
    return _xla_conv(x, w), (x, w)


def _conv_same_taps_bwd(residuals, dy):
    x, w = residuals
    _, input_vjp = jax.vjp(lambda x_: _xla_conv(x_, w), x)  # the input gradient only
    (dx,) = input_vjp(dy)
    dw = _tap_weight_grad(x, dy, w.shape[0]).astype(w.dtype)
    return dx, dw


_conv_same_taps.defvjp(_conv_same_taps_fwd, _conv_same_taps_bwd)


def conv_same(x: jax.Array, w: jax.Array, precision=None) -> jax.Array:
    """Stride-1 "SAME" convolution with GEMM gradients: x (B, H, W, C_in), w (k, k, C_in, C_out).

    Same values as ``lax.conv_general_dilated(x, w, (1, 1), "SAME", ("NHWC", "HWIO", "NHWC"))``
    up to float summation order. k must be odd (then "SAME" pads k // 2 on every side).

    >>> x, w = jnp.ones((2, 5, 5, 3)), jnp.ones((3, 3, 3, 4))
    >>> bool(jnp.allclose(conv_same(x, w), _xla_conv(x, w)))
    True
    """
    k_h, k_w = w.shape[:2]
    if k_h != k_w or k_h % 2 == 0:
        raise ValueError(f"conv_same needs an odd square kernel, got {w.shape[:2]}.")
    if k_h == 1:
        return jnp.einsum("bhwc,co->bhwo", x, w[0, 0], precision=precision)
    if precision is not None:  # the custom rule's GEMMs use default precision
        return _xla_conv(x, w, precision)
    return _conv_same_taps(x, w)


def _is_nhwc(dimension_numbers) -> bool:
    if dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, tuple) and all(isinstance(s, str) for s in dimension_numbers):
        return tuple(dimension_numbers) == _NHWC
    nhwc = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC)
    return tuple(map(tuple, dimension_numbers)) == tuple(map(tuple, nhwc))


def _is_same_padding(padding, kernel_shape) -> bool:
    if isinstance(padding, str):
        return padding.upper() == "SAME"
    if len(padding) != len(kernel_shape):
        return False
    return all(tuple(p) == (k // 2, k // 2) for p, k in zip(padding, kernel_shape, strict=True))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None, *,
                         impl: ConvImpl = "auto"):
    """``lax.conv_general_dilated`` with GEMM gradients for plain convolutions (see module doc).

    Use it as ``nn.Conv(..., conv_general_dilated=conv_fn(impl))``.
    """
    kernel_hw = tuple(rhs.shape[:2]) if rhs.ndim == 4 else ()
    plain = (
        resolve_impl(impl) == "gemm"
        and lhs.ndim == 4
        and _is_nhwc(dimension_numbers)
        and all(s == 1 for s in window_strides)
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and feature_group_count == 1
        and batch_group_count == 1
        and preferred_element_type is None
        and kernel_hw[0] == kernel_hw[1]
        and kernel_hw[0] % 2 == 1
        and _is_same_padding(padding, kernel_hw)
    )
    if plain:
        return conv_same(lhs, rhs, precision)
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)


def conv_fn(impl: ConvImpl = "auto"):
    """``conv_general_dilated`` with ``impl`` bound, for ``nn.Conv(conv_general_dilated=...)``.

    >>> conv_gemm = conv_fn("gemm")  # e.g. nn.Conv(4, (3, 3), conv_general_dilated=conv_gemm)
    >>> conv_gemm(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 4)), (1, 1), "SAME",
    ...           dimension_numbers=("NHWC", "HWIO", "NHWC")).shape
    (1, 4, 4, 4)
    """
    resolve_impl(impl)  # fail early on an unknown name
    return functools.partial(conv_general_dilated, impl=impl)
