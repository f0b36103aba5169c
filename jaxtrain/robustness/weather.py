"""Snow (CIFAR-10-C / ImageNet-C) in pure JAX.

``snow(x_NHWC, p, key) -> f32[N, H, W, C]`` on float images in [0, 1] with the encoded,
possibly traced, ``p = [loc, scale, zoom, threshold, radius, sigma, blend]`` of the
reference's tuple; the caller clips to [0, 1]. Per image: a snow layer N(loc, scale^2)
of the image's size, zoomed into its centre by ``zoom`` (the reference's clipped_zoom,
bilinear), zeroed below ``threshold``, clipped to [0, 1] and motion-blurred (radius,
sigma, angle U(-135, -45) degrees: ``blur.motion_blur_images``); the image becomes
``blend x + (1 - blend) max(x, 1.5 gray + 0.5)`` plus the layer and the layer turned by
180 degrees. ``gray`` is OpenCV's RGB2GRAY (0.299 R + 0.587 G + 0.114 B); for one
channel it is the image itself (as imagecorruptions does).

The reference writes the layer as an 8-bit PNG before and after ImageMagick's motion
blur (each a change of < 1/255); here it stays float. Keys are per batch: every image
draws its own layer and angle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtrain.robustness.blur import _interp_axis, _zoom_coords, motion_blur_images

Array = jax.Array

_GRAY = (0.299, 0.587, 0.114)  # cv2.COLOR_RGB2GRAY


def snow_layer(noise_NHW: Array, p: Array) -> Array:
    """The zoomed, thresholded, clipped snow layer f32[N, H, W] of unit normal draws."""
    _, h, w = noise_NHW.shape
    layer = p[0] + p[1] * noise_NHW
    zoom = jnp.maximum(p[2], 1.0)
    # The reference's zoom factors are float64 literals: a product crop * zoom ending in
    # .5 (26 * 1.25 at 32 px) is exact, and scipy's round() sends it to the even size.
    layer = _interp_axis(layer, _zoom_coords(h, zoom, ties_to_even=True), 1)
    layer = _interp_axis(layer, _zoom_coords(w, zoom, ties_to_even=True), 2)
    return jnp.clip(jnp.where(layer < p[3], 0.0, layer), 0.0, 1.0)


def snow_blend(x: Array, layer_NHW: Array, blend: Array) -> Array:
    """``blend x + (1 - blend) max(x, 1.5 gray + 0.5)`` plus the layer and its 180-degree turn."""
    gray = x if x.shape[-1] == 1 else jnp.einsum(
        "nhwc,c->nhw", x, jnp.asarray(_GRAY, x.dtype), precision=jax.lax.Precision.HIGHEST
    )[..., None]
    x = blend * x + (1.0 - blend) * jnp.maximum(x, gray * 1.5 + 0.5)
    snow = layer_NHW + layer_NHW[:, ::-1, ::-1]
    return x + snow[..., None]


def snow(x: Array, p: Array, key: Array) -> Array:
    n, h, w, _ = x.shape
    k_layer, k_angle = jax.random.split(key)
    layer = snow_layer(jax.random.normal(k_layer, (n, h, w)), p)
    angle = jax.random.uniform(k_angle, (n,), minval=-135.0, maxval=-45.0)
    layer = motion_blur_images(layer[..., None], p[4], p[5], angle)[..., 0]
    return snow_blend(x, layer, p[6])
