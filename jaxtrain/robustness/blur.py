"""The blurs of CIFAR-10-C / ImageNet-C: gaussian_blur, defocus_blur and zoom_blur.

Each is ``fn(x_NHWC, p, key) -> f32[N, H, W, C]`` on float images in [0, 1] with an
encoded, possibly traced, parameter vector ``p`` (``perturbations.param_array``); the
caller clips to [0, 1]. Parameters that set array shapes in the reference are computed
at a fixed maximum size (the constants below), so every severity is one program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

MAX_BLUR_RADIUS = 32  # gaussian_blur: taps int(4 * sigma + 0.5) <= 32
MAX_DEFOCUS_RADIUS = 10  # defocus_blur: disk radius (ImageNet-C's largest)
MAX_ZOOMS = 32  # zoom_blur: zoom factors per severity
_HIGHEST = lax.Precision.HIGHEST  # no TF32 on GPUs: results match CPU


def _depthwise(x: Array, kernel_KxL: Array) -> Array:
    """'VALID' correlation of every channel of f32[N, H, W, C] with one 2-D kernel."""
    c = x.shape[-1]
    k = jnp.broadcast_to(kernel_KxL[:, :, None, None], (*kernel_KxL.shape, 1, c))
    return lax.conv_general_dilated(x, k, (1, 1), "VALID", feature_group_count=c,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=_HIGHEST)


def _nearest_filter_matrix(n: int, taps: Array) -> Array:
    """f32[n, n] applying 1-D correlation with taps f32[2R+1] under 'nearest' padding."""
    r = (taps.shape[0] - 1) // 2
    rows = np.repeat(np.arange(n), 2 * r + 1)
    cols = np.clip(rows + np.tile(np.arange(-r, r + 1), n), 0, n - 1)  # edge taps pile up
    return jnp.zeros((n, n), taps.dtype).at[rows, cols].add(jnp.tile(taps, n))


def gaussian_blur(x: Array, p: Array, key: Array) -> Array:
    # scipy.ndimage.gaussian_filter(mode="nearest", truncate=4): taps |t| <= int(4 sigma + .5),
    # computed over the static MAX_BLUR_RADIUS with the others masked to zero, and applied
    # as one [H, H] and one [W, W] matrix.
    del key
    _, h, w, _ = x.shape
    sigma = jnp.maximum(p[0], 1e-6)
    t = jnp.arange(-MAX_BLUR_RADIUS, MAX_BLUR_RADIUS + 1, dtype=jnp.float32)
    radius = jnp.floor(4.0 * sigma + 0.5)
    taps = jnp.where(jnp.abs(t) <= radius, jnp.exp(-0.5 * (t / sigma) ** 2), 0.0)
    taps = taps / jnp.sum(taps)
    x = jnp.einsum("ih,nhwc->niwc", _nearest_filter_matrix(h, taps), x, precision=_HIGHEST)
    return jnp.einsum("jw,niwc->nijc", _nearest_filter_matrix(w, taps), x, precision=_HIGHEST)


def _defocus_kernel(radius: Array, alias_blur: Array) -> Array:
    """The reference's disk(radius, alias_blur) on a fixed f32[21, 21] grid.

    The reference builds the disk on the grid |X|, |Y| <= L with L = 8 (r <= 8) or r,
    then smooths it with cv2.GaussianBlur (3x3, or 5x5 for r > 8; border reflect-101
    at +-L). Here the grid is the static +-MAX_DEFOCUS_RADIUS and points outside +-L
    are masked, so r is traceable (for r > 8, L = ceil(r)).
    """
    g = MAX_DEFOCUS_RADIUS
    t = jnp.arange(-g, g + 1, dtype=jnp.float32)
    support = jnp.where(radius <= 8, 8.0, jnp.ceil(radius))
    inside = (jnp.abs(t) <= support).astype(jnp.float32)
    disk = (t[:, None] ** 2 + t[None, :] ** 2 <= radius ** 2).astype(jnp.float32)
    disk = disk * inside[:, None] * inside[None, :]
    disk = disk / jnp.sum(disk)
    # cv2.getGaussianKernel(ksize, sigma) taps over d = -2..2, masked to ksize.
    d = jnp.arange(-2, 3, dtype=jnp.float32)
    half = jnp.where(radius <= 8, 1.0, 2.0)
    taps = jnp.where(jnp.abs(d) <= half, jnp.exp(-(d ** 2) / (2.0 * alias_blur ** 2)), 0.0)
    taps = taps / jnp.sum(taps)
    j = t[:, None] + d[None, :]  # [21, 5] neighbour coordinates
    j = jnp.where(j > support, 2.0 * support - j, jnp.where(j < -support, -2.0 * support - j, j))
    idx = jnp.clip(j + g, 0, 2 * g).astype(jnp.int32)
    kernel = jnp.einsum("ijk,j->ik", disk[idx], taps, precision=_HIGHEST)  # along rows
    kernel = jnp.einsum("kij,j->ki", kernel[:, idx], taps, precision=_HIGHEST)  # along cols
    return kernel * inside[:, None] * inside[None, :]


def defocus_blur(x: Array, p: Array, key: Array) -> Array:
    del key
    g = MAX_DEFOCUS_RADIUS
    x = jnp.pad(x, ((0, 0), (g, g), (g, g), (0, 0)), mode="reflect")  # cv2 reflect-101
    return _depthwise(x, _defocus_kernel(p[0], p[1]))


def _interp_axis(x: Array, coord: Array, axis: int) -> Array:
    """Linear interpolation of `x` along `axis` at f32[n] coordinates within [0, size - 1]."""
    n = x.shape[axis]
    lo = jnp.floor(coord)
    frac = coord - lo
    i0 = jnp.clip(lo.astype(jnp.int32), 0, n - 1)
    i1 = jnp.clip(i0 + 1, 0, n - 1)
    shape = [1] * x.ndim
    shape[axis] = n
    frac = frac.reshape(shape)
    return jnp.take(x, i0, axis=axis) * (1 - frac) + jnp.take(x, i1, axis=axis) * frac


def _zoom_coords(n: int, z: Array) -> Array:
    """Source coordinates f32[n] of the reference's clipped_zoom along one axis.

    clipped_zoom crops the centre crop = ceil(n / z), scipy.ndimage.zoom(order=1)s it
    to out = round(crop * z) pixels and keeps the centre n. The offsets keep an exact
    integer n / z that integer and round .5 ties up, as the reference's float64 factors
    (a hair above their decimals) do for every preset factor at 32 and 224 px. At some
    other sizes the float64 product is an exact tie, which Python's round sends to the
    even size (16 px, z = 1.1: 16.5 -> 16, here 17): that zoom then sits half a pixel
    off the reference's (up to ~0.05 of a pixel value at 16 and 256 px).
    """
    crop = jnp.ceil(n / z - 1e-4)
    out = jnp.floor(crop * z + 0.5 + 1e-4)
    top = jnp.floor((n - crop) / 2)
    trim = jnp.floor((out - n) / 2)
    scale = (crop - 1) / jnp.maximum(out - 1, 1)
    return top + (jnp.arange(n, dtype=jnp.float32) + trim) * scale


def zoom_blur(x: Array, p: Array, key: Array) -> Array:
    # A fixed MAX_ZOOMS slots, each zoom kept where its factor is nonzero, so the
    # factor list is traceable.
    del key
    _, h, w, _ = x.shape

    def add_zoom(total: Array, z: Array) -> tuple[Array, None]:
        z1 = jnp.maximum(z, 1.0)
        zoomed = _interp_axis(_interp_axis(x, _zoom_coords(h, z1), 1), _zoom_coords(w, z1), 2)
        return total + jnp.where(z > 0, zoomed, 0.0), None

    total, _ = lax.scan(add_zoom, x, p)
    return total / (jnp.sum(p > 0) + 1).astype(jnp.float32)
