"""A stride-1 'SAME' convolution whose weight gradient is a matmul: ``models.CNN``'s conv on CPU.

On XLA:CPU the weight gradient of a convolution (the kernel's VJP, itself a
convolution of the input with the output cotangent) is the slowest piece of the
MNIST-shape CNN step. Measured alone on one CPU device (2 cores), batch 128:
22 ms for the 28x28x1 -> 32 conv and 87 ms for 14x14x32 -> 64, against 4.7 ms
and 31 ms as the matmuls below (batch 64: 10.3 / 17.2 ms against 2.4 / 10.7 ms);
the forward and input-gradient convolutions take 1-18 ms. The whole step got
1.28-1.5x faster. Those are YNNPACK's convolutions, XLA:CPU's default; jaxtrain
compiles its own programs with Eigen's (``compile_options``), whose weight
gradient beat these matmuls (the step 1.3x faster), so ``models.CNN`` takes them
only on one CPU device without those options. Over 2 CPU devices
(``--cpu-devices 2``) the step was slower with these matmuls (~0.8x).

``conv_same(x, kernel)`` is ``lax.conv_general_dilated`` (NHWC / HWIO, stride 1,
'SAME'), so forward values are XLA's convolution exactly, with a
``jax.custom_vjp`` that keeps XLA's input gradient and computes

    dkernel[i, j, c, f] = sum_{b, h, w} x_pad[b, h + i, w + j, c] * g[b, h, w, f]

as one matmul ``patches^T @ g`` when the patches are narrow (``kh * kw * C``
<= 32: one dot instead of ``kh * kw`` thin ones), otherwise as ``kh * kw``
matmuls ``x_shift^T @ g``. The same sum as XLA's, in another order: gradients
agree to float rounding (the test pins them to ``nn.Conv``'s). Hand-written
because no library offers this VJP.

``MatmulGradConv`` is the Flax module: the same parameters as ``nn.Conv``
(``kernel [kh, kw, C, F]``, ``bias [F]``, same initializers), so a checkpoint does
not care which one trained it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["MatmulGradConv", "conv_same", "nn_conv_params"]

_DIMS = ("NHWC", "HWIO", "NHWC")
_IM2COL_MAX_WIDTH = 32  # kh * kw * C up to this: one im2col dot (28x28x1: 2.4 vs 2.8 ms)


def _pads(kernel_HWIF: jnp.ndarray) -> list[tuple[int, int]]:
    """'SAME' padding for stride 1: what ``nn.Conv`` and XLA use (the extra row or
    column of an even kernel goes after)."""
    return [((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel_HWIF.shape[:2]]


def _conv(x_BHWC: jnp.ndarray, kernel_HWIF: jnp.ndarray) -> jnp.ndarray:
    return lax.conv_general_dilated(x_BHWC, kernel_HWIF, (1, 1), _pads(kernel_HWIF),
                                    dimension_numbers=_DIMS)


@jax.custom_vjp
def conv_same(x_BHWC: jnp.ndarray, kernel_HWIF: jnp.ndarray) -> jnp.ndarray:
    """``[B, H, W, C] * [kh, kw, C, F] -> [B, H, W, F]``, stride 1, 'SAME' padding."""
    return _conv(x_BHWC, kernel_HWIF)


def _fwd(x_BHWC, kernel_HWIF):
    return _conv(x_BHWC, kernel_HWIF), (x_BHWC, kernel_HWIF)


def _bwd(res, g_BHWF):
    x_BHWC, kernel_HWIF = res
    _, vjp_x = jax.vjp(lambda x: _conv(x, kernel_HWIF), x_BHWC)
    (dx,) = vjp_x(g_BHWF)
    kh, kw, c, f = kernel_HWIF.shape
    _, h, w, _ = x_BHWC.shape
    (top, bottom), (left, right) = _pads(kernel_HWIF)
    x_pad = jnp.pad(x_BHWC, ((0, 0), (top, bottom), (left, right), (0, 0)))
    shifts = [x_pad[:, i:i + h, j:j + w, :].reshape((-1, c)) for i in range(kh) for j in range(kw)]
    g_NF = g_BHWF.reshape((-1, f))
    if kh * kw * c <= _IM2COL_MAX_WIDTH:
        patches_NK = jnp.concatenate(shifts, axis=-1)  # feature order (kh, kw, C): HWIO's
        dk = jnp.dot(patches_NK.T, g_NF, preferred_element_type=jnp.float32)
    else:
        dk = jnp.stack([jnp.dot(s.T, g_NF, preferred_element_type=jnp.float32)
                        for s in shifts])
    return dx, dk.reshape((kh, kw, c, f)).astype(kernel_HWIF.dtype)


conv_same.defvjp(_fwd, _bwd)


def nn_conv_params(module: nn.Module, in_features: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``nn.Conv``'s parameters, declared on ``module`` (with ``features`` and
    ``kernel_size`` fields): ``kernel [kh, kw, C, F]`` (LeCun normal) and ``bias [F]``
    (zeros), float32. Modules that only lower a convolution differently declare
    these, so checkpoints move freely between them and ``nn.Conv``."""
    kernel = module.param("kernel", nn.initializers.lecun_normal(),
                          (*module.kernel_size, in_features, module.features), jnp.float32)
    bias = module.param("bias", nn.initializers.zeros, (module.features,), jnp.float32)
    return kernel, bias


class MatmulGradConv(nn.Module):
    """``nn.Conv(features, kernel_size)`` (stride 1, 'SAME', bias) on ``conv_same``.

    Same parameters and initializers as ``nn.Conv``; ``dtype`` is the computation
    dtype (parameters stay float32)."""

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC: jnp.ndarray) -> jnp.ndarray:
        kernel, bias = nn_conv_params(self, x_BHWC.shape[-1])
        y = conv_same(x_BHWC.astype(self.dtype), kernel.astype(self.dtype))
        return y + bias.astype(self.dtype).reshape((1, 1, 1, -1))
