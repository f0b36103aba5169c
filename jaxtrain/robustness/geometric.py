"""Corruptions that move pixels: the elastic transform of CIFAR-10-C / ImageNet-C, and
rotation, translation and occlusion (beyond the reference set).

Each is ``fn(x_NHWC, p, key) -> f32[N, H, W, C]`` on float images in [0, 1] with an
encoded, possibly traced, parameter vector ``p`` (``perturbations.param_array``); the
caller clips to [0, 1]. Keys are per batch: every image draws its own part of them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy import ndimage

Array = jax.Array

# elastic_transform: the displacement smoothing's taps |t| <= int(3 * sigma + .5) <= this;
# ImageNet-C's largest sigma, 244 * 0.7, needs 512.
MAX_ELASTIC_RADIUS = 512
_HIGHEST = lax.Precision.HIGHEST


def _pixel_grid(h: int, w: int) -> tuple[Array, Array]:
    i, j = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing="ij")
    return i[None], j[None]  # f32[1, H, W]


def _resample(x: Array, src_i: Array, src_j: Array, mode: str = "constant") -> Array:
    """Bilinear sampling of f32[N, H, W, C] at per-image coordinates f32[N, H, W]
    (``jax.scipy.ndimage.map_coordinates``: "constant" fills zeros, "mirror" is
    OpenCV's reflect-101, "reflect" scipy's half-sample reflection)."""
    def one_image(img: Array, si: Array, sj: Array) -> Array:
        sample = lambda ch: ndimage.map_coordinates(ch, [si, sj], order=1, mode=mode)
        return jax.vmap(sample, in_axes=2, out_axes=2)(img)

    return jax.vmap(one_image)(x, src_i, src_j)


# ----------------------------------------------------------------------------- elastic


def _reflect_gaussian_matrix(n: int, sigma: Array) -> Array:
    """f32[n, n]: scipy.ndimage.gaussian_filter1d(mode="reflect", truncate=3) as a matrix.

    Taps ``|t| <= int(3 sigma + .5)`` out of a static ``MAX_ELASTIC_RADIUS`` (the rest
    weigh 0), so sigma may be traced; a tap beyond the edge reads the half-sample
    reflection ``d c b a | a b c d | d c b a`` repeated, as scipy's does when the kernel
    is wider than the image. sigma ~ 0: the identity (scipy skips the axis)."""
    r = MAX_ELASTIC_RADIUS
    t = np.arange(-r, r + 1)
    safe = jnp.maximum(sigma, 1e-6)
    taps = jnp.where(np.abs(t) <= jnp.floor(3.0 * safe + 0.5),
                     jnp.exp(-0.5 * (t.astype(np.float32) / safe) ** 2), 0.0)
    taps = jnp.where(sigma > 1e-15, taps / jnp.sum(taps), (t == 0).astype(np.float32))
    rows = np.repeat(np.arange(n), 2 * r + 1)
    m = np.mod(rows + np.tile(t, n), 2 * n)
    cols = np.where(m < n, m, 2 * n - 1 - m)
    return jnp.zeros((n, n), jnp.float32).at[rows, cols].add(jnp.tile(taps, n))


def _affine_sources(h: int, w: int, jitter_N32: Array) -> tuple[Array, Array]:
    """Source coordinates f32[N, H, W] (rows, columns) of OpenCV's ``warpAffine`` with the
    reference's random affine: three points around the centre, each moved by its jitter
    (pixels, (x, y) order), define the map; each output pixel reads the inverse map."""
    s = min(h, w) // 3
    cx, cy = w // 2, h // 2
    # The reference takes its centre as (H // 2, W // 2) in OpenCV's (x, y) order: the
    # same points for square images; (W // 2, H // 2) here for any other.
    pts1 = jnp.asarray([[cx + s, cy + s], [cx + s, cy - s], [cx - s, cy - s]], jnp.float32)
    pts2 = pts1[None] + jitter_N32
    # Inverse map dst -> src: [x y 1] @ inv_32 = source (x, y) for the three points.
    lhs = jnp.concatenate([pts2, jnp.ones((*pts2.shape[:2], 1), jnp.float32)], axis=-1)
    inv = jnp.linalg.solve(lhs, jnp.broadcast_to(pts1[None], pts2.shape))  # [N, 3, 2]
    ident = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], jnp.float32)
    ok = jnp.all(jnp.isfinite(inv), axis=(1, 2), keepdims=True)
    inv = jnp.where(ok, inv, ident)  # collinear points (a jitter as large as the square)
    i, j = _pixel_grid(h, w)
    a = inv[:, :, :, None, None]  # [N, 3, 2, 1, 1]
    return (j * a[:, 0, 1] + i * a[:, 1, 1] + a[:, 2, 1],   # source rows (y)
            j * a[:, 0, 0] + i * a[:, 1, 0] + a[:, 2, 0])   # source columns (x)


def elastic_transform(x: Array, p: Array, key: Array) -> Array:
    """The reference's elastic_transform (``make_cifar_c.py``, ``make_imagenet_c.py``),
    ``p = [alpha, sigma, jitter]`` in pixels:

    1. a random affine warp: three points at the centre +- ``min(H, W) // 3`` each move
       by ``U(-jitter, jitter)`` per coordinate; OpenCV ``warpAffine``, bilinear,
       reflect-101 border;
    2. displacement fields ``dx, dy = alpha * G_sigma(U(-1, 1)[H, W])`` (scipy gaussian
       filter, reflect, truncate 3), the same for every channel;
    3. bilinear resampling at ``(i + dy, j + dx)``, reflect border (scipy
       ``map_coordinates(order=1, mode="reflect")``).

    Checked by hand against the reference code itself (OpenCV 5.1, scipy) fed the same
    random draws: equal within 6e-6 at 32 px (cifar, 1 and 3 channels) and 224 px
    (imagenet), all severities. The unit tests compare with scipy alone."""
    n, h, w, _ = x.shape
    alpha, sigma, jitter = p[0], p[1], p[2]
    k_aff, k_dx, k_dy = jax.random.split(key, 3)
    jit_N32 = jax.random.uniform(k_aff, (n, 3, 2), minval=-1.0, maxval=1.0) * jitter
    if min(h, w) >= 3:  # else the three points coincide: no affine part
        x = _resample(x, *_affine_sources(h, w, jit_N32), mode="mirror")
    gh, gw = _reflect_gaussian_matrix(h, sigma), _reflect_gaussian_matrix(w, sigma)

    def field(k: Array) -> Array:
        u = jax.random.uniform(k, (n, h, w), minval=-1.0, maxval=1.0)
        return alpha * jnp.einsum("ih,nhw,jw->nij", gh, u, gw, precision=_HIGHEST)

    i, j = _pixel_grid(h, w)
    return _resample(x, i + field(k_dy), j + field(k_dx), mode="reflect")


# ----------------------------------------------------------------------------- beyond the reference


def rotation(x: Array, p: Array, key: Array) -> Array:
    """Rotation by ``p[0]`` degrees about the centre, random sign per image; bilinear, zero fill."""
    n, h, w, _ = x.shape
    sign = jnp.where(jax.random.bernoulli(key, 0.5, (n,)), 1.0, -1.0)
    theta = (sign * p[0] * (math.pi / 180.0)).reshape(n, 1, 1)
    i, j = _pixel_grid(h, w)
    ci, cj = (h - 1) / 2, (w - 1) / 2
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    src_i = ci + (i - ci) * cos - (j - cj) * sin
    src_j = cj + (i - ci) * sin + (j - cj) * cos
    return _resample(x, src_i, src_j)


def translation(x: Array, p: Array, key: Array) -> Array:
    """A shift by ``p[0]`` of the image's side in a random direction, whole pixels, zero fill."""
    n, h, w, _ = x.shape
    angle = jax.random.uniform(key, (n,), maxval=2 * math.pi).reshape(n, 1, 1)
    shift_i = jnp.round(p[0] * h * jnp.sin(angle))
    shift_j = jnp.round(p[0] * w * jnp.cos(angle))
    i, j = _pixel_grid(h, w)
    return _resample(x, i - shift_i, j - shift_j)


def occlusion(x: Array, p: Array, key: Array) -> Array:
    """A black square of side ``p[0] * min(H, W)`` at a random place inside each image."""
    # top = round(u * (H - side)) and top + side are monotone in side: nested squares.
    n, h, w, _ = x.shape
    side = jnp.round(p[0] * min(h, w))
    u = jax.random.uniform(key, (n, 2))
    top = jnp.round(u[:, :1] * (h - side))  # [N, 1]
    left = jnp.round(u[:, 1:] * (w - side))
    rows = jnp.arange(h, dtype=jnp.float32)[None, :]
    cols = jnp.arange(w, dtype=jnp.float32)[None, :]
    in_rows = (rows >= top) & (rows < top + side)  # [N, H]
    in_cols = (cols >= left) & (cols < left + side)  # [N, W]
    hole = in_rows[:, :, None, None] & in_cols[:, None, :, None]
    return jnp.where(hole, 0.0, x)
