"""The blurs of CIFAR-10-C / ImageNet-C: gaussian, defocus, glass, motion and zoom blur.

Each is ``fn(x_NHWC, p, key) -> f32[N, H, W, C]`` on float images in [0, 1] with an
encoded, possibly traced, parameter vector ``p`` (``perturbations.param_array``); the
caller clips to [0, 1]. Parameters that set array shapes in the reference are computed
at a fixed maximum size (the constants below), so every severity is one program.
Parameters that set a loop's length in the reference (glass blur's swap passes, motion
blur's taps) are the traced trip count of a ``lax.fori_loop``: under ``jax.vmap`` over
severities it runs to the largest one's count, the others' state held fixed.
Keys are per batch: every image draws its own part of them (glass blur's offsets,
motion blur's angle).
"""

from __future__ import annotations

from collections.abc import Callable

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


def _zoom_coords(n: int, z: Array, ties_to_even: bool = False) -> Array:
    """Source coordinates f32[n] of the reference's clipped_zoom along one axis.

    clipped_zoom crops the centre crop = ceil(n / z), scipy.ndimage.zoom(order=1)s it
    to out = round(crop * z) pixels and keeps the centre n. The offsets keep an exact
    integer n / z that integer and round .5 ties up, as the reference's float64 factors
    (a hair above their decimals) do for every preset factor at 32 and 224 px. At some
    other sizes the float64 product is an exact tie, which Python's round sends to the
    even size (16 px, z = 1.1: 16.5 -> 16, here 17): that zoom then sits half a pixel
    off the reference's (up to ~0.05 of a pixel value at 16 and 256 px).
    ``ties_to_even`` rounds the size as Python does an exact product (snow's factors are
    float64 literals such as 1.25, not sums of 0.01 steps).
    """
    crop = jnp.ceil(n / z - 1e-4)
    out = jnp.round(crop * z) if ties_to_even else jnp.floor(crop * z + 0.5 + 1e-4)
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


# ------------------------------------------------------------------------------ glass blur


def glass_uniforms(keys_N: Array, pass_index: Array, h: int, w: int) -> Array:
    """f32[N, H, W, 2] in [0, 1): the draws of pass ``pass_index`` of ``glass_sources``
    (the visit of pixel (h, w) of image n reads ``[n, h, w]`` as its (dx, dy))."""
    return jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, pass_index),
                                                 (h, w, 2)))(keys_N)


def glass_pass(uniforms_NHW2: Array, delta: Array) -> Array:
    """i32[N, H * W]: the pixel (flat index, in the image before the pass) whose value each
    pixel holds after one pass of the reference's moves (see ``glass_sources``).

    Visit v writes pixel p_v from the pixel b_v it reads, as b_v is at that time: its own
    visit's result if b_v was visited before v, else b_v's value before the pass (each
    pixel is written once a pass, by its own visit). So a pixel's source is found by
    following ``read`` links to earlier visits back to the first one that reads an
    unvisited (or not yet visited) pixel: pointer doubling, ceil(log2(H W)) gathers,
    instead of one sequential step per visit.
    """
    n, h, w, _ = uniforms_NHW2.shape
    d = delta.astype(jnp.int32)
    rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.int32), jnp.arange(w, dtype=jnp.int32),
                              indexing="ij")
    j, k = h - d - rows, w - d - cols  # the reference's loop counters: h, w descending
    visited = (j >= 0) & (j < h - 2 * d) & (k >= 0) & (k < w - 2 * d)
    order = jnp.where(visited, j * w + k, h * w).reshape(h * w)  # visit order; h w: never
    off = jnp.floor(uniforms_NHW2 * (2 * d).astype(jnp.float32)).astype(jnp.int32) - d
    off = jnp.clip(off, -d, d - 1)  # dx = off[..., 0], dy = off[..., 1] in {-d .. d - 1}
    self_index = (rows * w + cols)[None]
    read = jnp.where(visited[None], (rows[None] + off[..., 1]) * w + cols[None] + off[..., 0],
                     self_index).reshape(n, h * w)
    flat = self_index.reshape(1, h * w)
    # A visit whose read pixel was written earlier takes that pixel's result: a link.
    linked = order[read] < order[None]
    ptr = jnp.where(linked, read, flat)
    ptr = lax.fori_loop(0, max(1, (h * w - 1).bit_length()),
                        lambda _, q: jnp.take_along_axis(q, q, axis=1), ptr)
    return jnp.take_along_axis(read, ptr, axis=1)


def glass_sources(keys_N: Array, h: int, w: int, delta: Array, iterations: Array,
                  draw: Callable[[Array], Array] | None = None) -> Array:
    """i32[N, H * W]: the source pixel of each position after the reference's local moves.

    The reference visits h = H - d .. d + 1 (descending), within it w = W - d .. d + 1, draws
    dx, dy uniform in {-d .. d - 1} and runs ``x[h, w], x[h', w'] = x[h', w'], x[h, w]``
    with (h', w') = (h + dy, w + dx); the whole pass runs ``iterations`` times. On an
    H x W x C array both sides are numpy views, so (h, w) takes the value of (h', w') and
    (h', w') keeps its own: a copy, not a swap, and that is what the published CIFAR-10-C /
    ImageNet-C images hold; so does this, for any C. Each visit sees the previous ones
    (``glass_pass``); channels follow with one gather at the end.
    ``draw(i) -> f32[N, H, W, 2]`` gives pass i's uniforms (default ``glass_uniforms``):
    dx = floor(2 d u_0) - d, dy = floor(2 d u_1) - d.
    """
    n = keys_N.shape[0]
    if draw is None:
        draw = lambda i: glass_uniforms(keys_N, i, h, w)

    def one_pass(i: Array, src: Array) -> Array:
        return jnp.take_along_axis(src, glass_pass(draw(i), delta), axis=1)

    init = jnp.broadcast_to(jnp.arange(h * w, dtype=jnp.int32), (n, h * w))
    return lax.fori_loop(0, iterations.astype(jnp.int32), one_pass, init)


def glass_blur(x: Array, p: Array, key: Array) -> Array:
    # Gaussian blur (sigma p[0]), the reference's local moves (max offset p[1], p[2]
    # passes: glass_sources), Gaussian blur again. The reference rounds to uint8 after the
    # first blur (< 1/255); not here.
    n, h, w, c = x.shape
    src = glass_sources(jax.random.split(key, n), h, w, jnp.round(p[1]), jnp.round(p[2]))
    x = gaussian_blur(x, p, key)
    x = jnp.take_along_axis(x.reshape(n, h * w, c), src[..., None], axis=1).reshape(n, h, w, c)
    return gaussian_blur(x, p, key)


# ----------------------------------------------------------------------------- motion blur


def motion_shifts(i: Array, angle_deg: Array) -> tuple[Array, Array]:
    """(dy, dx) of motion-blur tap ``i`` at ``angle_deg``: ImageMagick's kernel as
    imagecorruptions writes it, -ceil(i sin(a) - 1/2) and -ceil(i cos(a) - 1/2). Where
    i sin(a) or i cos(a) is a half-integer (a = 30, 60, 120 ... degrees) the reference's
    float64 rounding picks the tap and float32 may pick the next; angles are drawn at
    random, so that has probability 0."""
    a = jnp.deg2rad(angle_deg)
    dy = -jnp.ceil(i * jnp.sin(a) - 0.5)
    dx = -jnp.ceil(i * jnp.cos(a) - 0.5)
    return dy.astype(jnp.int32), dx.astype(jnp.int32)


def motion_blur_images(x: Array, radius: Array, sigma: Array, angle_N: Array) -> Array:
    """ImageMagick's motion blur (imagecorruptions' ``_motion_blur``) of f32[N, H, W, C].

    Tap i = 0 .. 2 radius weighs exp(-i^2 / 2 sigma^2) (normalised over all 2 radius + 1
    taps) and reads the image shifted by ``motion_shifts(i, angle)`` with edge pixels
    repeated; the reference stops at the first tap shifted by a whole image side or more
    (those weights are lost), and so does this (its shifts only grow with i). One angle
    (degrees) per image."""
    n, h, w, _ = x.shape
    width = (2 * jnp.round(radius) + 1).astype(jnp.int32)
    sigma = jnp.maximum(sigma, 1e-6)
    rows, cols = jnp.arange(h), jnp.arange(w)
    images = jnp.arange(n)[:, None, None]

    def tap(i: Array, carry: tuple[Array, Array]) -> tuple[Array, Array]:
        total, norm = carry
        fi = i.astype(jnp.float32)
        weight = jnp.exp(-(fi * fi) / (2.0 * sigma * sigma))
        dy, dx = motion_shifts(fi, angle_N)  # [N]
        inside = (jnp.abs(dy) < h) & (jnp.abs(dx) < w)
        src_r = jnp.clip(rows[None] - dy[:, None], 0, h - 1)  # [N, H]
        src_c = jnp.clip(cols[None] - dx[:, None], 0, w - 1)  # [N, W]
        shifted = x[images, src_r[:, :, None], src_c[:, None, :]]
        total = total + jnp.where(inside, weight, 0.0)[:, None, None, None] * shifted
        return total, norm + weight

    total, norm = lax.fori_loop(0, width, tap, (jnp.zeros_like(x), jnp.zeros((), jnp.float32)))
    return total / norm


def motion_blur(x: Array, p: Array, key: Array) -> Array:
    # radius p[0], sigma p[1], angle U(-45, 45) degrees per image.
    angle = jax.random.uniform(key, (x.shape[0],), minval=-45.0, maxval=45.0)
    return motion_blur_images(x, p[0], p[1], angle)
