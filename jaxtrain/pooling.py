"""A 2x2 max pool whose gradient is elementwise: ``models.CNN``'s pooling.

On XLA:CPU the gradient of ``nn.max_pool`` (``reduce_window`` max, whose VJP is
``select_and_scatter``) is the slowest part of the MNIST-shape CNN training step:
measured on 2 CPU cores (batch 128), the two pooling backward passes took about
90 + 54 ms of a ~250 ms step, where PyTorch's take about 29 + 15 ms.

``max_pool_2x2`` is the same function (2x2 window, stride 2, 'VALID') with a
``jax.custom_vjp`` whose backward is elementwise: the forward records, per
output, which element of the window is its first maximum in row-major order (one
uint8), and the backward routes the cotangent there, which is what
``select_and_scatter`` with the ``ge`` select of ``max_pool`` does, so gradients
are identical, ties included (ties are common after a ReLU: whole windows of
zeros). It fuses into a few loops instead of a scatter, about 5-8x faster for
these shapes.

``relu_max_pool_2x2`` is ``max_pool_2x2(nn.relu(x))`` in one: its code also
says "no gradient" where the maximum is not positive, so the backward needs no
full-size ReLU output; the convolution feeding it then has a single consumer,
which XLA neither writes out for the backward nor recomputes in two fusions. With the
tap-sum first convolution (``conv.conv_same(taps=True)``) the MNIST-shape step
ran 1.13-1.56x faster than ReLU + ``max_pool_2x2`` with XLA's convolutions
(paired rounds, 2 cores, batch 128); the fused pool alone was within noise.

``models.CNN`` uses it by default (``pool="elementwise"``; ``pool="xla"`` is
``nn.relu`` then ``nn.max_pool``): same parameters, same outputs and gradients,
so checkpoints do not care which. Hand-written because no library offers these
VJPs; the tests pin both to ``nn.max_pool`` exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["max_pool_2x2", "relu_max_pool_2x2"]


def _crop(x_BHWC: jnp.ndarray) -> jnp.ndarray:
    """Drops the last row / column of odd sizes, as 'VALID' pooling does."""
    h, w = x_BHWC.shape[1] // 2 * 2, x_BHWC.shape[2] // 2 * 2
    return x_BHWC[:, :h, :w, :]


def _window(x_BHWC: jnp.ndarray) -> list[jnp.ndarray]:
    """A 2x2 window's four elements ``[B, H/2, W/2, C]``, row-major (of even H, W)."""
    b, h, w, c = x_BHWC.shape
    x6 = x_BHWC.reshape((b, h // 2, 2, w // 2, 2, c))
    return [x6[:, :, 0, :, 0], x6[:, :, 0, :, 1], x6[:, :, 1, :, 0], x6[:, :, 1, :, 1]]


def _max4(e: list[jnp.ndarray]) -> jnp.ndarray:
    # the maximum of the window's four elements, not ``.max(axis=(2, 4))`` of the 6-D
    # view: the same values, 3x faster on XLA:CPU (relu + pool of 128x28x28x32: 0.5 vs
    # 1.7 ms)
    return jnp.maximum(jnp.maximum(e[0], e[1]), jnp.maximum(e[2], e[3]))


def _pool_code(x_BHWC: jnp.ndarray, relu: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The pooled maximum (``relu``: of the ReLU) and, per output, a uint8 code: the
    row-major position (0-3) of the window's first maximum, which takes the whole
    cotangent as ``select_and_scatter``'s ``ge`` select does, or 4 for no gradient (no
    element equals the maximum, a NaN; with ``relu``, a maximum that is not positive)."""
    e = _window(x_BHWC)
    m = _max4(e)
    code = jnp.where(e[0] == m, 0, jnp.where(e[1] == m, 1, jnp.where(
        e[2] == m, 2, jnp.where(e[3] == m, 3, 4))))
    if relu:
        code, m = jnp.where(m > 0, code, 4), jnp.maximum(m, jnp.zeros((), m.dtype))
    return m, code.astype(jnp.uint8)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _pool_even(x_BHWC: jnp.ndarray, relu: bool) -> jnp.ndarray:
    return _pool_code(x_BHWC, relu)[0]


def _pool_even_fwd(x_BHWC, relu):
    return _pool_code(x_BHWC, relu)


def _pool_even_bwd(relu, code_BhwC, g_BhwC):
    del relu  # in the code already
    b, h, w, c = code_BhwC.shape
    zero = jnp.zeros((), g_BhwC.dtype)
    parts = [jnp.where(code_BhwC == k, g_BhwC, zero) for k in range(4)]
    rows = [jnp.stack(parts[:2], axis=3), jnp.stack(parts[2:], axis=3)]
    return (jnp.stack(rows, axis=2).reshape((b, 2 * h, 2 * w, c)),)


_pool_even.defvjp(_pool_even_fwd, _pool_even_bwd)


def relu_max_pool_2x2(x_BHWC: jnp.ndarray) -> jnp.ndarray:
    """``max_pool_2x2(nn.relu(x))``, the same values and gradients (relu commutes with
    max; the gradient goes to the window's first maximum when it is positive), fused:
    the backward keeps one byte per output (which element, if any, gets the gradient)
    instead of the ReLU's full-size output, and the convolution before it has one
    consumer, so XLA neither writes nor recomputes it twice."""
    return _pool_even(_crop(x_BHWC), True)  # cropped rows / columns get no gradient


def max_pool_2x2(x_BHWC: jnp.ndarray) -> jnp.ndarray:
    """``nn.max_pool(x, (2, 2), strides=(2, 2))`` (NHWC, 'VALID') with an
    elementwise backward pass instead of ``select_and_scatter``."""
    return _pool_even(_crop(x_BHWC), False)
