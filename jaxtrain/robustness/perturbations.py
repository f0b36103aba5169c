"""Common corruptions (CIFAR-10-C / ImageNet-C) and geometric shifts, in pure JAX.

Every corruption maps float images ``f32[N, H, W, C]`` in [0, 1] (C = 1 or 3) to
images of the same shape, dtype and range; the last step is always a clip to
[0, 1]. Formulas and the ``cifar`` / ``imagenet`` parameter tables follow
``docs/ROBUSTNESS.md`` (Hendrycks & Dietterich 2019, ``make_cifar_c.py`` and
``make_imagenet_c.py``).

Two entry points:

- ``perturb(images, name, severity, key, preset="cifar", params=None)`` looks
  up the parameter tuple of a severity (1..5) in a preset, or uses ``params``.
  Under ``jax.jit``, ``name``, ``preset`` (and ``params``) are static; a static
  ``severity`` is validated, a traced one selects a row of the preset table.
- ``perturb_by_param(images, name, param, key)`` takes the *encoded* parameter
  vector ``f32[P]`` (``param_array`` / ``stacked_params`` build it), which may
  be traced, so all five severities run as one program::

      fn = lambda p: perturb_by_param(images, "fog", p, key)
      out_SxNxHxWxC = jax.vmap(fn)(stacked_params("fog", "cifar"))

Encoded parameter vectors, ``param_array(name, params)``; ``params`` is the
ROBUSTNESS.md tuple, and the vector is that tuple except for zoom_blur:

  gaussian_noise  [c]             std of the additive noise
  shot_noise      [c]             photons per unit intensity
  impulse_noise   [c]             fraction of values set to 0 or 1
  speckle_noise   [c]             std of the multiplicative noise
  gaussian_blur   [sigma]         sigma < 8.125 (taps int(4 sigma + .5) <= 32)
  defocus_blur    [r, a]          disk radius r <= 10, alias-blur sigma a
  glass_blur      [sigma, d, n]   blur sigma < 8.125, whole max offset d >= 1 and
                                  passes n >= 1 of the local pixel moves
  motion_blur     [r, sigma]      whole radius r >= 0 (2r + 1 taps), sigma > 0;
                                  angle U(-45, 45) degrees per image
  brightness      [c]             added to V (HSV); to x for one channel
  contrast        [c]             (x - mean) * c + mean
  saturate        [a, b]          S * a + b (HSV); identity for one channel
  pixelate        [c]             intermediate size int(size * c)
  zoom_blur       [z_0 .. z_31]   np.arange(start, stop, step) of the tuple
                                  (float64, as the reference: (1, 1.06, .01)
                                  gives 7 factors), zero-padded to 32
  fog             [a, d]          amplitude, wibble decay
  snow            [loc, scale, zoom, threshold, r, sigma, blend]  layer N(loc, scale^2)
                                  (scale >= 0), zoom >= 1, zeroed below threshold,
                                  motion-blurred (whole r >= 0, sigma > 0, angle
                                  U(-135, -45)), blend in [0, 1]
  elastic_transform [alpha, sigma, jitter]  pixels: displacement scale, its
                                  smoothing sigma (< 170.83), affine jitter
  jpeg_compression [c]            JPEG quality 1..100
  rotation        [degrees]       random sign per image
  translation     [f]             shift of f * size pixels, random direction
  occlusion       [f]             zeroed square of side f * min(H, W)

Parameters that set array shapes in the reference are made traceable by
computing at a fixed maximum size: Gaussian taps over a fixed radius with the
unused taps masked, the defocus disk on a fixed 21x21 grid, pixelate as an
``[H, H]`` / ``[W, W]`` resampling matrix built from index arithmetic, zoom
blur as a masked sum over 32 zoom slots, and snow's zoom as bilinear source
coordinates. Parameters that set a loop's length (glass blur's passes, motion
blur's taps) are a ``lax.fori_loop``'s traced trip count; under
``jax.vmap`` the loop runs to the largest severity's count with the others held.
``param_array`` raises ValueError for parameters beyond these bounds.

One channel: ``brightness`` is ``x + c``, ``saturate`` is the identity (there
is no hue or saturation to change), and snow's grayscale is the image itself.

Glass blur, motion blur and snow (``blur``, ``weather``) follow the reference's
code as it ran: glass blur's swap line, on an H x W x C array of numpy views,
copies the neighbour into the visited pixel and leaves the neighbour as it was
(the published images hold that), and each move sees the earlier ones, as in
the reference's loop (a pass's chains of copies are resolved by pointer
doubling, log2(H W) gathers, not one step a pixel); motion blur is
ImageMagick's kernel as imagecorruptions writes it (2r + 1 taps of weight
exp(-i^2 / 2 sigma^2) along the angle, edge pixels repeated, taps past the
image side dropped). The reference's 8-bit round trips
(glass blur's uint8 after the first blur, snow's PNG layer) are left out: each
moves a value by less than 1/255. Offsets, angles and the snow layer come from
the key (their distributions are the reference's; the draws are not NumPy's).

``elastic_transform`` (``geometric``) keeps the reference's parameters in pixels
(fractions of 32 and of 244 px), so the presets fit 32 and 224 px images; its
Gaussian smoothing is an ``[H, H]`` / ``[W, W]`` matrix over up to 512 taps.
``jpeg_compression`` (``jpeg``) runs Pillow on the host through
``jax.pure_callback``: it works under jit and vmap, at a host round trip per call.
With these two and the 15 above, the in-memory set has all 14 corruptions of
ROBUSTNESS.md's table and glass blur, motion blur and snow: 14 of the 15 of
mCE (all but frost). Frost and spatter (the rest of the 19) exist only as the
published images (``tfds_c``): frost blends crops of the reference's six frost photographs,
which are data files and not a formula; spatter runs OpenCV's Canny edges,
distance transform and histogram equalisation on its liquid layer, none of
them in this module.

Rotation, translation and occlusion are not in the reference; their presets
are scale-free and the same for both presets: rotation by 6, 12, 18, 24, 30
degrees (bilinear, zero fill); translation by 1/16 .. 5/16 of the image side
(2..10 px at 32 px, rounded to whole pixels, zero fill); occlusion by a black
square of side 0.1 .. 0.5 of the shorter side, at a random position inside
the image (squares of one key are nested across severities).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxtrain.robustness import blur, geometric, jpeg, weather
from jaxtrain.robustness.blur import MAX_BLUR_RADIUS, MAX_DEFOCUS_RADIUS, MAX_ZOOMS
from jaxtrain.robustness.poisson import poisson

__all__ = [
    "CORRUPTIONS", "MAX_BLUR_RADIUS", "MAX_DEFOCUS_RADIUS", "MAX_ZOOMS", "PRESETS", "SEVERITIES",
    "corruption_params", "hsv_to_rgb", "param_array", "perturb", "perturb_by_param", "poisson",
    "rgb_to_hsv", "stacked_params",
]

Array = jax.Array
ParamTuple = tuple[float, ...]

SEVERITIES = (1, 2, 3, 4, 5)

_HIGHEST = lax.Precision.HIGHEST  # no TF32 on GPUs: results match CPU


def _rows(*values: float | tuple[float, ...]) -> tuple[ParamTuple, ...]:
    return tuple(tuple(float(x) for x in v) if isinstance(v, tuple) else (float(v),)
                 for v in values)


_ROTATION = _rows(6, 12, 18, 24, 30)
_TRANSLATION = _rows(1 / 16, 2 / 16, 3 / 16, 4 / 16, 5 / 16)
_OCCLUSION = _rows(0.1, 0.2, 0.3, 0.4, 0.5)

# PRESETS[preset][name][severity - 1] is the parameter tuple of ROBUSTNESS.md.
PRESETS: dict[str, dict[str, tuple[ParamTuple, ...]]] = {
    "cifar": {
        "gaussian_noise": _rows(0.04, 0.06, 0.08, 0.09, 0.10),
        "shot_noise": _rows(500, 250, 100, 75, 50),
        "impulse_noise": _rows(0.01, 0.02, 0.03, 0.05, 0.07),
        "speckle_noise": _rows(0.06, 0.10, 0.12, 0.16, 0.20),
        "gaussian_blur": _rows(0.4, 0.6, 0.7, 0.8, 1),
        "defocus_blur": _rows((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
        "glass_blur": _rows((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
        "motion_blur": _rows((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
        "brightness": _rows(0.05, 0.1, 0.15, 0.2, 0.3),
        "contrast": _rows(0.75, 0.5, 0.4, 0.3, 0.15),
        "saturate": _rows((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),
        "pixelate": _rows(0.95, 0.9, 0.85, 0.75, 0.65),
        "zoom_blur": _rows((1, 1.06, 0.01), (1, 1.11, 0.01), (1, 1.16, 0.01),
                           (1, 1.21, 0.01), (1, 1.26, 0.01)),
        "fog": _rows((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
        "snow": _rows((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
                      (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
                      (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),
        "elastic_transform": _rows(*((32 * a, 32 * b, 32 * c) for a, b, c in (
            (0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05),
            (0.1, 0.03, 0.03)))),
        "jpeg_compression": _rows(80, 65, 58, 50, 40),
        "rotation": _ROTATION,
        "translation": _TRANSLATION,
        "occlusion": _OCCLUSION,
    },
    "imagenet": {
        "gaussian_noise": _rows(0.08, 0.12, 0.18, 0.26, 0.38),
        "shot_noise": _rows(60, 25, 12, 5, 3),
        "impulse_noise": _rows(0.03, 0.06, 0.09, 0.17, 0.27),
        "speckle_noise": _rows(0.15, 0.20, 0.35, 0.45, 0.60),
        "gaussian_blur": _rows(1, 2, 3, 4, 6),
        "defocus_blur": _rows((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
        "glass_blur": _rows((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)),
        "motion_blur": _rows((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
        "brightness": _rows(0.1, 0.2, 0.3, 0.4, 0.5),
        "contrast": _rows(0.4, 0.3, 0.2, 0.1, 0.05),
        "saturate": _rows((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)),
        "pixelate": _rows(0.6, 0.5, 0.4, 0.3, 0.25),
        "zoom_blur": _rows((1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02),
                           (1, 1.26, 0.02), (1, 1.31, 0.03)),
        "fog": _rows((1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4)),
        "snow": _rows((0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
                      (0.55, 0.3, 4, 0.9, 12, 8, 0.7), (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
                      (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)),
        # 244 (not 224) as in the reference, whose comment keeps it on purpose.
        "elastic_transform": _rows(*((244 * a, 244 * b, 244 * c) for a, b, c in (
            (2, 0.7, 0.1), (2, 0.08, 0.2), (0.05, 0.01, 0.02), (0.07, 0.01, 0.02),
            (0.12, 0.01, 0.02)))),
        "jpeg_compression": _rows(25, 18, 15, 10, 7),
        "rotation": _ROTATION,
        "translation": _TRANSLATION,
        "occlusion": _OCCLUSION,
    },
}
CORRUPTIONS: tuple[str, ...] = tuple(PRESETS["cifar"])


# ---------------------------------------------------------------- validation


def _check_name(name: str) -> None:
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; valid: {', '.join(CORRUPTIONS)}")


def _check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")


def _check_severity(severity: Any) -> int:
    try:
        s = operator.index(severity)
    except TypeError:
        s = None
    if s is None or isinstance(severity, bool) or s not in SEVERITIES:
        raise ValueError(f"severity must be one of 1, 2, 3, 4, 5; got {severity!r}")
    return s


def corruption_params(name: str, severity: int, preset: str = "cifar") -> ParamTuple:
    """The parameter tuple of ROBUSTNESS.md for `name` at `severity` (1..5) in `preset`."""
    _check_name(name)
    _check_preset(preset)
    return PRESETS[preset][name][_check_severity(severity) - 1]


def param_array(name: str, params: float | Sequence[float]) -> np.ndarray:
    """Encodes one ROBUSTNESS.md parameter tuple as the vector f32[P] of `perturb_by_param`.

    The identity for every corruption but zoom_blur, whose (start, stop, step) becomes
    the zoom factors np.arange(start, stop, step) (float64, as the reference) padded
    with zeros to MAX_ZOOMS. Raises ValueError for values outside the static bounds.
    """
    _check_name(name)
    p = tuple(float(v) for v in np.ravel(np.asarray(params, np.float64)))
    arity = len(PRESETS["cifar"][name][0])
    if len(p) != arity:
        raise ValueError(f"{name} takes {arity} parameter(s), got {len(p)}: {p}")

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"{name}: {what}, got {p}")

    if name == "zoom_blur":
        zooms = np.arange(*p)
        need(0 < len(zooms) <= MAX_ZOOMS, f"needs 1..{MAX_ZOOMS} zoom factors")
        need(bool(np.all(zooms >= 1)), "zoom factors must be >= 1")
        return np.pad(zooms, (0, MAX_ZOOMS - len(zooms))).astype(np.float32)
    def whole(v: float, low: int) -> bool:
        return float(v).is_integer() and v >= low

    if name in ("gaussian_blur", "glass_blur"):
        need(0 < p[0] and int(4 * p[0] + 0.5) <= MAX_BLUR_RADIUS, "needs 0 < sigma < 8.125")
        if name == "glass_blur":
            need(whole(p[1], 1) and whole(p[2], 1),
                 "needs a whole max offset >= 1 and a whole number of passes >= 1")
    elif name == "motion_blur":
        need(whole(p[0], 0) and p[1] > 0, "needs a whole radius >= 0 and sigma > 0")
    elif name == "snow":
        need(p[1] >= 0 and p[2] >= 1 and whole(p[4], 0) and p[5] > 0 and 0 <= p[6] <= 1,
             "needs scale >= 0, zoom >= 1, a whole radius >= 0, sigma > 0 and 0 <= blend <= 1")
    elif name == "defocus_blur":
        need(0 < p[0] <= MAX_DEFOCUS_RADIUS and p[1] > 0,
             f"needs 0 < radius <= {MAX_DEFOCUS_RADIUS} and alias blur > 0")
    elif name == "pixelate":
        need(0 < p[0] <= 1, "needs 0 < c <= 1")
    elif name == "shot_noise":
        need(p[0] > 0, "needs c > 0")
    elif name == "impulse_noise":
        need(0 <= p[0] <= 1, "needs 0 <= c <= 1")
    elif name == "fog":
        need(p[0] >= 0 and p[1] > 0, "needs amplitude >= 0 and decay > 0")
    elif name == "elastic_transform":
        need(min(p) >= 0 and int(3 * p[1] + 0.5) <= geometric.MAX_ELASTIC_RADIUS,
             "needs alpha, jitter >= 0 and 0 <= sigma < 170.83 (taps int(3 sigma + .5) "
             f"<= {geometric.MAX_ELASTIC_RADIUS})")
    elif name == "jpeg_compression":
        need(1 <= p[0] <= 100, "needs a quality in 1..100")
    return np.asarray(p, np.float32)


def stacked_params(name: str, preset: str = "cifar") -> np.ndarray:
    """Encoded parameters of all five severities, f32[5, P], for jax.vmap."""
    _check_name(name)
    _check_preset(preset)
    return np.stack([param_array(name, p) for p in PRESETS[preset][name]])


def _param_size(name: str) -> int:
    return MAX_ZOOMS if name == "zoom_blur" else len(PRESETS["cifar"][name][0])


def _params_table(name: str, params: Any) -> tuple[Any, ...]:
    """`params` as 5 per-severity tuples: a single tuple is used for every severity."""
    arity = len(PRESETS["cifar"][name][0])
    n = len(SEVERITIES)
    flat = np.asarray(params, np.float64)
    if flat.size == arity:
        return (flat,) * n
    if flat.shape == (n, arity) or (arity == 1 and flat.shape == (n,)):
        return tuple(flat.reshape(n, arity))
    raise ValueError(f"params for {name} must be one tuple of {arity} value(s) or {n} of "
                     f"them (one per severity); got shape {flat.shape}")


# ------------------------------------------------------------------ colour


def rgb_to_hsv(rgb: Array) -> Array:
    """f32[..., 3] RGB in [0, 1] -> HSV in [0, 1] (skimage.color.rgb2hsv semantics)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = jnp.max(rgb, axis=-1)
    delta = v - jnp.min(rgb, axis=-1)
    gray = delta == 0
    s = jnp.where(gray, 0.0, delta / jnp.where(v > 0, v, 1.0))
    d = jnp.where(gray, 1.0, delta)
    h = jnp.where(b == v, 4.0 + (r - g) / d,
                  jnp.where(g == v, 2.0 + (b - r) / d, (g - b) / d))
    h = jnp.where(gray, 0.0, jnp.mod(h / 6.0, 1.0))
    return jnp.stack([h, s, v], axis=-1)


def hsv_to_rgb(hsv: Array) -> Array:
    """f32[..., 3] HSV in [0, 1] -> RGB (skimage.color.hsv2rgb / colorsys semantics)."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    hi = jnp.floor(h * 6.0)
    f = h * 6.0 - hi
    p = v * (1.0 - s)
    q = v * (1.0 - f * s)
    t = v * (1.0 - (1.0 - f) * s)
    sector = jnp.mod(hi.astype(jnp.int32), 6)
    rgb_by_sector = jnp.stack([jnp.stack(c, axis=-1) for c in  # [6, ..., 3]
                               [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]])
    return jnp.take_along_axis(rgb_by_sector, sector[None, ..., None], axis=0)[0]


def _map_hsv(x: Array, fn: Callable[[Array], Array]) -> Array:
    return hsv_to_rgb(fn(rgb_to_hsv(x)))


# ------------------------------------------------------------------- noise


def _gaussian_noise(x: Array, p: Array, key: Array) -> Array:
    return x + p[0] * jax.random.normal(key, x.shape)


def _shot_noise(x: Array, p: Array, key: Array) -> Array:
    return poisson(key, x * p[0]) / p[0]


def _impulse_noise(x: Array, p: Array, key: Array) -> Array:
    k_mask, k_salt = jax.random.split(key)
    hit = jax.random.uniform(k_mask, x.shape) < p[0]
    salt = jax.random.bernoulli(k_salt, 0.5, x.shape)
    return jnp.where(hit, salt.astype(jnp.float32), x)


def _speckle_noise(x: Array, p: Array, key: Array) -> Array:
    return x + x * p[0] * jax.random.normal(key, x.shape)


# ----------------------------------------------------------------- colour ops


def _brightness(x: Array, p: Array, key: Array) -> Array:
    del key
    if x.shape[-1] == 1:
        return x + p[0]
    return _map_hsv(x, lambda hsv: hsv.at[..., 2].set(jnp.clip(hsv[..., 2] + p[0], 0, 1)))


def _contrast(x: Array, p: Array, key: Array) -> Array:
    del key
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    return (x - mean) * p[0] + mean


def _saturate(x: Array, p: Array, key: Array) -> Array:
    del key
    if x.shape[-1] == 1:
        return x
    return _map_hsv(x, lambda hsv: hsv.at[..., 1].set(jnp.clip(hsv[..., 1] * p[0] + p[1], 0, 1)))


# ------------------------------------------------------------------ pixelate


def _box_resample_matrix(n: int, c: Array) -> Array:
    """f32[n, n]: PIL BOX resize n -> m = int(n * c) -> n, as one matrix.

    PIL's BOX filter assigns each input pixel x to output pixel ceil(m(2x+1)/2n) - 1
    when shrinking and output X reads pixel floor(m(2X+1)/2n) when growing; here in
    exact integer arithmetic on static-size index arrays, so m may be traced. Equal to
    PIL at 28, 32, 64, 96 and 224 px; where an input pixel's centre falls exactly on a
    box edge (e.g. 41, 57, 227, 299 px), PIL's float arithmetic drops it from both boxes
    and here it counts in one (an output pixel then differs by up to ~0.4).
    """
    m = jnp.clip(jnp.floor(n * c + 1e-4), 1, n).astype(jnp.int32)
    i = jnp.arange(n, dtype=jnp.int32)
    group_of_input = (m * (2 * i + 1) + 2 * n - 1) // (2 * n) - 1
    group_of_output = (m * (2 * i + 1)) // (2 * n)
    member = (group_of_output[:, None] == group_of_input[None, :]).astype(jnp.float32)
    return member / jnp.sum(member, axis=1, keepdims=True)


def _pixelate(x: Array, p: Array, key: Array) -> Array:
    del key
    _, h, w, _ = x.shape
    x = jnp.einsum("ih,nhwc->niwc", _box_resample_matrix(h, p[0]), x, precision=_HIGHEST)
    return jnp.einsum("jw,niwc->nijc", _box_resample_matrix(w, p[0]), x, precision=_HIGHEST)


# ----------------------------------------------------------------------- fog


def _plasma_uniforms(key: Array, size: int, n: int) -> list[Array]:
    """U(-1, 1) draws of diamond-square for n maps: level k gets f32[n, 3, 2^k, 2^k]."""
    sizes = [3 * 4**k for k in range(size.bit_length() - 1)]
    flat = jax.random.uniform(key, (n, sum(sizes)), minval=-1.0)  # one draw: fast to compile
    levels = jnp.split(flat, np.cumsum(sizes)[:-1], axis=1)
    return [u.reshape(n, 3, 2**k, 2**k) for k, u in enumerate(levels)]


def _plasma_fractal(uniforms: Sequence[Array], decay: Array) -> Array:
    """Diamond-square height map f32[S, S] in [0, 1] (the reference's plasma_fractal).

    Level k refines the 2^k x 2^k grid of points filled so far into the 2^(k+1) grid by
    interleaving the new square and diamond points (no scatters: fast to compile).
    The reference's wibbledmean adds wibble * U(-wibble, wibble) = wibble^2 * U(-1, 1),
    wibble = 100 divided by `decay` after each level.
    """
    grid = jnp.zeros((1, 1), jnp.float32)
    wibble = jnp.asarray(100.0, jnp.float32)
    for u in uniforms:
        n = grid.shape[0]
        u = wibble * wibble * u
        down = jnp.roll(grid, -1, axis=0)  # grid[i + 1, j]
        right, down_right = jnp.roll(jnp.stack([grid, down]), -1, axis=2)  # [i, j + 1], ...
        centre = (grid + down + right + down_right) / 4 + u[0]  # rows half::step, cols half::step
        above, before = jnp.roll(centre, 1, axis=0), jnp.roll(centre, 1, axis=1)
        left = (centre + above + grid + right) / 4 + u[1]  # rows 0::step, cols half::step
        top = (centre + before + grid + down) / 4 + u[2]  # rows half::step, cols 0::step
        fine = jnp.stack([grid, left, top, centre]).reshape(2, 2, n, n)  # [row parity, col parity]
        grid = fine.transpose(2, 0, 3, 1).reshape(2 * n, 2 * n)
        wibble = wibble / decay
    grid = grid - jnp.min(grid)
    return grid / jnp.maximum(jnp.max(grid), 1e-12)


def _fog(x: Array, p: Array, key: Array) -> Array:
    n, h, w, _ = x.shape
    size = max(2, 1 << (max(h, w) - 1).bit_length())  # next power of 2 >= max(H, W)
    maps = jax.vmap(lambda u: _plasma_fractal(u, p[1]))(_plasma_uniforms(key, size, n))
    peak = jnp.max(x, axis=(1, 2, 3), keepdims=True)
    amplitude = p[0]
    return (x + amplitude * maps[:, :h, :w, None]) * peak / jnp.maximum(peak + amplitude, 1e-12)


_IMPLS: dict[str, Callable[[Array, Array, Array], Array]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "speckle_noise": _speckle_noise,
    "gaussian_blur": blur.gaussian_blur,
    "defocus_blur": blur.defocus_blur,
    "glass_blur": blur.glass_blur,
    "motion_blur": blur.motion_blur,
    "brightness": _brightness,
    "contrast": _contrast,
    "saturate": _saturate,
    "pixelate": _pixelate,
    "zoom_blur": blur.zoom_blur,
    "fog": _fog,
    "snow": weather.snow,
    "elastic_transform": geometric.elastic_transform,
    "jpeg_compression": jpeg.jpeg_compression,
    "rotation": geometric.rotation,
    "translation": geometric.translation,
    "occlusion": geometric.occlusion,
}
assert tuple(_IMPLS) == CORRUPTIONS


# ---------------------------------------------------------------- public API


def perturb_by_param(images: Array, name: str, param: Array, key: Array) -> Array:
    """Corrupts f32[N, H, W, C] images in [0, 1] with an encoded, possibly traced, f32[P].

    `name` is static; `param` is `param_array(name, ...)` or a row of `stacked_params`
    (see the module docstring for each layout), so jax.vmap over a stacked f32[5, P]
    evaluates all severities in one program. Returns the images' shape and dtype.
    """
    _check_name(name)
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N, H, W, C] with C in (1, 3); got {images.shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"images must be float in [0, 1]; got dtype {images.dtype}")
    size = _param_size(name)
    if jnp.size(param) != size:
        raise ValueError(f"{name} takes an encoded param of {size} value(s); "
                         f"got shape {jnp.shape(param)} (see param_array)")
    p = jnp.reshape(jnp.asarray(param, jnp.float32), (size,))
    out = _IMPLS[name](images.astype(jnp.float32), p, key)
    return jnp.clip(out, 0.0, 1.0).astype(images.dtype)


def perturb(images: Array, name: str, severity: int | Array, key: Array,
            preset: str = "cifar", params: Any = None) -> Array:
    """Corrupts f32[N, H, W, C] images in [0, 1] with `name` at `severity` (1..5).

    `preset` ("cifar" or "imagenet") picks the ROBUSTNESS.md parameters; `params`
    overrides them, either one parameter tuple (for every severity) or five (one
    per severity); it must be concrete. Under jax.jit mark `name` and `preset`
    static; a static `severity` is validated, a traced one indexes the five
    parameter vectors (clamped to 1..5). Returns the images' shape and dtype.
    """
    _check_name(name)
    _check_preset(preset)
    table = PRESETS[preset][name] if params is None else _params_table(name, params)
    if isinstance(severity, jax.core.Tracer):
        stacked = jnp.asarray(np.stack([param_array(name, t) for t in table]))
        index = jnp.asarray(severity, jnp.int32) - 1
        param = jnp.take(stacked, index, axis=0, mode="clip")
    else:
        param = param_array(name, table[_check_severity(severity) - 1])
    return perturb_by_param(images, name, param, key)
