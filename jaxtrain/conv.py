"""Convolutions lowered for XLA:CPU, ``models``' layers there: matmul weight gradients
(``conv_same``), tap sums (``conv_taps``), Eigen-layout gradients (``conv_nhwc``).

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

``conv_same(x, kernel, taps=True)`` computes the forward as ``kh * kw * C``
broadcast multiply-adds instead (one elementwise loop; XLA's values to float
rounding), for narrow inputs: the MNIST image's 28x28x1 -> 32 forward took
0.8 ms, against 5-6 ms as XLA:CPU's convolution (Eigen's or YNNPACK's); a
CIFAR image's (C = 3) 5.4 against 9.6 ms. The backward is the one above.

``conv_nhwc`` is ``lax.conv_general_dilated`` for NHWC / HWIO (any strides and
padding) with a backward written in the one layout XLA:CPU hands to Eigen. JAX's
own VJP emits the input and kernel gradients as convolutions with permuted
dimension numbers (``b01f_01oi->b01f``, ``f01b_i01o->01bf``); XLA:CPU rewrites
those into Eigen's form outside loops, but not inside a while loop (``lax.scan``,
``fori_loop``, ``lax.map``: fused steps, PGD attacks, seed chunks), where they
fall to XLA's generic loop emitter. Measured on 2 cores (14x14x32 -> 64, batch
128, Eigen convolutions; ``benchmarks/results/conv_loops-cpu.json``): the kernel
gradient inside a ``fori_loop`` took 1170 ms against 11.5 ms outside it, the input
gradient 39 against 9 ms; with ``conv_nhwc`` both run at their outside-loop speed
(12 ms each), and PGD got 2.3x faster on the CNN and ``resnet_tiny``. The gradients are the same
convolutions on explicitly transposed operands (equal to JAX's). ``models`` pass
it to ``nn.Conv(conv_general_dilated=...)`` on CPU, so parameters do not change.

``conv_taps(x, kernel)`` is the tap-sum forward with ``conv_nhwc``'s backward: the
first layer of ``models.CNN`` on CPU where jaxtrain's programs run Eigen's
convolutions. There the matmul weight gradient of a narrow input (``kh * kw * C``
<= 32) lost to Eigen's: on a 2-core Intel Xeon (AVX-512), MNIST-shape CNN, batch
128, the whole training step went from 26.6 to 33.0 steps/s (1.24x) with one step
per call, and with fused steps from 36.5 (25 a call) to 38.6 (29, the default), in
one run beside PyTorch (``benchmarks/results/torch_peer-cpu-xeon-cnn-first-layer.json``).
Under YNNPACK's convolutions (no ``compile_options``) the conv weight gradient took
3.6 ms against the matmul's 1.7, so ``CNN`` keeps ``conv_same(taps=True)`` there.

``MatmulGradConv`` and ``TapsConv`` are the Flax modules: the same parameters as
``nn.Conv`` (``kernel [kh, kw, C, F]``, ``bias [F]``, same initializers), so a
checkpoint does not care which one trained it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["MatmulGradConv", "TapsConv", "conv_nhwc", "conv_same", "conv_taps", "is_narrow",
           "nn_conv_params"]

_DIMS = ("NHWC", "HWIO", "NHWC")
_IM2COL_MAX_WIDTH = 32  # kh * kw * C up to this: one im2col dot (28x28x1: 2.4 vs 2.8 ms)


def _pads(kernel_HWIF: jnp.ndarray) -> list[tuple[int, int]]:
    """'SAME' padding for stride 1: what ``nn.Conv`` and XLA use (the extra row or
    column of an even kernel goes after)."""
    return [((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel_HWIF.shape[:2]]


def _conv(x_BHWC: jnp.ndarray, kernel_HWIF: jnp.ndarray) -> jnp.ndarray:
    return lax.conv_general_dilated(x_BHWC, kernel_HWIF, (1, 1), _pads(kernel_HWIF),
                                    dimension_numbers=_DIMS)


def _shifted(x_BHWC: jnp.ndarray, kernel_HWIF: jnp.ndarray) -> list[jnp.ndarray]:
    """The ``kh * kw`` shifted views ``x_pad[:, i:i + H, j:j + W, :]``, row-major (HWIO's order)."""
    kh, kw = kernel_HWIF.shape[:2]
    _, h, w, _ = x_BHWC.shape
    (top, bottom), (left, right) = _pads(kernel_HWIF)
    x_pad = jnp.pad(x_BHWC, ((0, 0), (top, bottom), (left, right), (0, 0)))
    return [x_pad[:, i:i + h, j:j + w, :] for i in range(kh) for j in range(kw)]


def _conv_taps(x_BHWC: jnp.ndarray, kernel_HWIF: jnp.ndarray) -> jnp.ndarray:
    """The convolution as ``kh * kw * C`` broadcast multiply-adds, float32 accumulation:
    one elementwise loop, for narrow inputs (an MNIST image's ``C = 1``: 0.8 ms where
    XLA:CPU's convolution took 5-6 ms, batch 128, 2 cores)."""
    c = x_BHWC.shape[-1]
    kernel = kernel_HWIF.astype(jnp.float32).reshape((-1, c, kernel_HWIF.shape[-1]))
    acc = None
    for t, view in enumerate(_shifted(x_BHWC.astype(jnp.float32), kernel_HWIF)):
        for ci in range(c):
            term = view[..., ci:ci + 1] * kernel[t, ci].reshape((1, 1, 1, -1))
            acc = term if acc is None else acc + term
    return acc.astype(x_BHWC.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_same(x_BHWC: jnp.ndarray, kernel_HWIF: jnp.ndarray, taps: bool = False) -> jnp.ndarray:
    """``[B, H, W, C] * [kh, kw, C, F] -> [B, H, W, F]``, stride 1, 'SAME' padding.

    ``taps``: the forward as broadcast multiply-adds (``_conv_taps``; equal to XLA's
    to float rounding) instead of XLA's convolution (equal to ``nn.Conv`` exactly)."""
    return _conv_taps(x_BHWC, kernel_HWIF) if taps else _conv(x_BHWC, kernel_HWIF)


def _fwd(x_BHWC, kernel_HWIF, taps):
    return conv_same(x_BHWC, kernel_HWIF, taps), (x_BHWC, kernel_HWIF)


def _bwd(taps, res, g_BHWF):
    del taps  # both forwards compute the same function: one backward
    x_BHWC, kernel_HWIF = res
    dx = _input_grad(g_BHWF, kernel_HWIF, x_BHWC.shape[1:3], (1, 1), tuple(_pads(kernel_HWIF)))
    kh, kw, c, f = kernel_HWIF.shape
    shifts = [view.reshape((-1, c)) for view in _shifted(x_BHWC, kernel_HWIF)]
    g_NF = g_BHWF.reshape((-1, f))
    if is_narrow((kh, kw), c):
        patches_NK = jnp.concatenate(shifts, axis=-1)  # feature order (kh, kw, C): HWIO's
        dk = jnp.dot(patches_NK.T, g_NF, preferred_element_type=jnp.float32)
    else:
        dk = jnp.stack([jnp.dot(s.T, g_NF, preferred_element_type=jnp.float32)
                        for s in shifts])
    return dx, dk.reshape((kh, kw, c, f)).astype(kernel_HWIF.dtype)


conv_same.defvjp(_fwd, _bwd)


Pads = tuple[tuple[int, int], ...]


def _per_model(conv: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
               ) -> Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]:
    """``conv(a, b)`` whose ``vmap`` over both operands (each model its own weights and
    activations: ``--num-seeds``) runs one convolution per model (``lax.map``),
    not XLA's one grouped convolution (``feature_group_count`` = the model count),
    which XLA:CPU ran 1.2-2.5x slower: 4 seeds' 14x14x32 -> 64 convolutions (batch
    128, 2 cores) forward 38.9 against 24.8 ms, input gradient 56.7 against 25.0,
    weight gradient 51.4 against 42.0; whole 4-seed MNIST-shape CNN runs 1.37x the
    steps/s (``docs/PERFORMANCE.md``). A vmap over one operand only (perturbed inputs
    through one model), or off CPU, keeps JAX's rule, which folds a vmapped input
    into the batch."""

    @jax.custom_batching.custom_vmap
    def per_model(a, b):
        return conv(a, b)

    @per_model.def_vmap
    def _rule(axis_size, in_batched, a, b):
        del axis_size
        if all(in_batched) and jax.default_backend() == "cpu":  # measured on XLA:CPU only
            return lax.map(lambda ab: per_model(*ab), (a, b)), True
        return jax.vmap(conv, in_axes=tuple(0 if t else None for t in in_batched))(a, b), True

    return per_model


def _input_grad(g_BhwF: jnp.ndarray, kernel_HWIF: jnp.ndarray, in_hw: Sequence[int],
                strides: tuple[int, ...], pads: Pads) -> jnp.ndarray:
    """dL/dx ``[B, H, W, C]`` of ``conv(x, kernel, strides, pads)`` from its cotangent
    ``[B, h, w, F]``: the cotangent, dilated by the strides, convolved with the kernel
    flipped and its I/O swapped (``[kh, kw, F, C]``): JAX's rule in NHWC / HWIO."""
    pad = []
    for n, k, o, s, (lo, _) in zip(in_hw, kernel_HWIF.shape[:2], g_BhwF.shape[1:3], strides, pads):
        before = k - lo - 1
        pad.append((before, n + k - 1 - ((o - 1) * s + 1) - before))

    def conv(g, kernel):
        flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
        return lax.conv_general_dilated(g, flipped, (1, 1), pad, lhs_dilation=strides,
                                        dimension_numbers=_DIMS)
    return _per_model(conv)(g_BhwF, kernel_HWIF)


def _kernel_grad(x_BHWC: jnp.ndarray, g_BhwF: jnp.ndarray, kernel_hw: Sequence[int],
                 strides: tuple[int, ...], pads: Pads) -> jnp.ndarray:
    """dL/dkernel ``[kh, kw, C, F]``: the input with channels as batch (``[C, H, W, B]``)
    convolved with the cotangent as a kernel (``[h, w, B, F]``, dilated by the
    strides), then ``[C, kh, kw, F]`` to HWIO: JAX's rule in NHWC / HWIO."""
    pad = []
    for n, k, o, s, (lo, _) in zip(x_BHWC.shape[1:3], kernel_hw, g_BhwF.shape[1:3], strides, pads):
        pad.append((lo, ((o - 1) * s + 1) - n + k - lo - 1))

    def conv(x, g):
        dk = lax.conv_general_dilated(x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3),
                                      (1, 1), pad, rhs_dilation=strides, dimension_numbers=_DIMS)
        return dk.transpose(1, 2, 0, 3)
    return _per_model(conv)(x_BHWC, g_BhwF)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_nhwc(x_BHWC: jnp.ndarray, kernel_HWIF: jnp.ndarray, strides: tuple[int, ...],
               pads: Pads) -> jnp.ndarray:
    conv = functools.partial(lax.conv_general_dilated, window_strides=strides, padding=pads,
                             dimension_numbers=_DIMS)
    return _per_model(conv)(x_BHWC, kernel_HWIF)


def _nhwc_fwd(x_BHWC, kernel_HWIF, strides, pads):
    return _conv_nhwc(x_BHWC, kernel_HWIF, strides, pads), (x_BHWC, kernel_HWIF)


def _nhwc_bwd(strides, pads, res, g_BhwF):
    x_BHWC, kernel_HWIF = res
    return (_input_grad(g_BhwF, kernel_HWIF, x_BHWC.shape[1:3], strides, pads),
            _kernel_grad(x_BHWC, g_BhwF, kernel_HWIF.shape[:2], strides, pads))


_conv_nhwc.defvjp(_nhwc_fwd, _nhwc_bwd)


def conv_nhwc(lhs: jnp.ndarray, rhs: jnp.ndarray, window_strides: Sequence[int],
              padding: str | Sequence[tuple[int, int]], lhs_dilation: Sequence[int] | None = None,
              rhs_dilation: Sequence[int] | None = None, dimension_numbers: Any = None,
              feature_group_count: int = 1, batch_group_count: int = 1, precision: Any = None,
              preferred_element_type: Any = None) -> jnp.ndarray:
    """``lax.conv_general_dilated``'s signature and values; a 2-D NHWC / HWIO convolution
    without dilation or groups gets the Eigen-layout backward (module docstring), any
    other falls through to ``lax.conv_general_dilated`` unchanged."""
    plain = functools.partial(
        lax.conv_general_dilated, lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
        dimension_numbers, feature_group_count, batch_group_count, precision,
        preferred_element_type)
    if lhs.ndim != 4 or rhs.ndim != 4 or feature_group_count != 1 or batch_group_count != 1 \
            or precision is not None or preferred_element_type is not None \
            or any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))):
        return plain()
    dims = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if dims != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DIMS):
        return plain()
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    return _conv_nhwc(lhs, rhs, strides, tuple((int(lo), int(hi)) for lo, hi in padding))


@jax.custom_vjp
def conv_taps(x_BHWC: jnp.ndarray, kernel_HWIF: jnp.ndarray) -> jnp.ndarray:
    """``[B, H, W, C] * [kh, kw, C, F] -> [B, H, W, F]``, stride 1, 'SAME': the forward
    as tap sums (``conv_same(taps=True)``'s values), the backward ``conv_nhwc``'s
    (its gradients are XLA's to float rounding)."""
    return _conv_taps(x_BHWC, kernel_HWIF)


def _taps_fwd(x_BHWC, kernel_HWIF):
    return conv_taps(x_BHWC, kernel_HWIF), (x_BHWC, kernel_HWIF)


def _taps_bwd(res, g_BHWF):
    return _nhwc_bwd((1, 1), tuple(_pads(res[1])), res, g_BHWF)


conv_taps.defvjp(_taps_fwd, _taps_bwd)


def nn_conv_params(module: nn.Module, in_features: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``nn.Conv``'s parameters, declared on ``module`` (with ``features`` and
    ``kernel_size`` fields): ``kernel [kh, kw, C, F]`` (LeCun normal) and ``bias [F]``
    (zeros), float32. Modules that only lower a convolution differently declare
    these, so checkpoints move freely between them and ``nn.Conv``."""
    kernel = module.param("kernel", nn.initializers.lecun_normal(),
                          (*module.kernel_size, in_features, module.features), jnp.float32)
    bias = module.param("bias", nn.initializers.zeros, (module.features,), jnp.float32)
    return kernel, bias


def _with_bias(module: nn.Module, x_BHWC: jnp.ndarray,
               conv: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]) -> jnp.ndarray:
    """``conv(x, kernel) + bias`` in ``module.dtype`` on ``nn.Conv``'s parameters
    (``nn_conv_params``): the body of this module's ``nn.Conv`` stand-ins."""
    kernel, bias = nn_conv_params(module, x_BHWC.shape[-1])
    y = conv(x_BHWC.astype(module.dtype), kernel.astype(module.dtype))
    return y + bias.astype(module.dtype).reshape((1, 1, 1, -1))


def is_narrow(kernel_size: tuple[int, int], in_features: int) -> bool:
    """Whether ``kh * kw * C`` is small enough for one im2col dot in the weight gradient
    and for ``conv_same(taps=True)``'s forward (an image's first convolution)."""
    return kernel_size[0] * kernel_size[1] * in_features <= _IM2COL_MAX_WIDTH


class MatmulGradConv(nn.Module):
    """``nn.Conv(features, kernel_size)`` (stride 1, 'SAME', bias) on ``conv_same``.

    Same parameters and initializers as ``nn.Conv``; ``dtype`` is the computation
    dtype (parameters stay float32); ``taps``: ``conv_same``'s multiply-add forward."""

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    dtype: Any = jnp.float32
    taps: bool = False

    @nn.compact
    def __call__(self, x_BHWC: jnp.ndarray) -> jnp.ndarray:
        return _with_bias(self, x_BHWC, functools.partial(conv_same, taps=self.taps))


class TapsConv(nn.Module):
    """``nn.Conv(features, kernel_size)`` (stride 1, 'SAME', bias) on ``conv_taps``: a
    narrow input's tap-sum forward with Eigen-layout gradients. Same parameters and
    initializers as ``nn.Conv``; ``dtype`` is the computation dtype."""

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC: jnp.ndarray) -> jnp.ndarray:
        return _with_bias(self, x_BHWC, conv_taps)
