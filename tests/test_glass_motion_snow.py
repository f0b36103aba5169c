"""glass_blur, motion_blur and snow against NumPy transcriptions of the reference.

The references are written here from make_cifar_c.py / make_imagenet_c.py (glass blur,
snow) and imagecorruptions' ``_motion_blur`` (ImageMagick's motion blur kernel), in
float64, and fed the draws the JAX code makes from its key (white box: the glass offsets
of ``blur.glass_uniforms``, the snow layer's normals and the angles). The deterministic
pieces (one pass of glass moves with given offsets, the motion kernel at given angles)
are checked on their own, at several image sizes. The contract (shape, dtype, range,
keys, one vmapped program == per-severity ``perturb``, one and three channels) is
``tests/test_perturbations.py``'s, which runs every corruption.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi
from test_perturbations import clipped_zoom  # make_cifar_c's, per axis (tests/ is on the path)

from jaxtrain.robustness import blur, weather
from jaxtrain.robustness import perturbations as P
from jaxtrain.robustness.evaluator import FAST_COMPILE  # as the suite compiles on CPU

_RNG = np.random.default_rng(77)
# 32 px: CIFAR's size (snow's severity-5 zoom 26 * 1.25 = 32.5 is a tie there);
# 8 x 12: digits' height, not square, and small enough that motion taps leave the image
# and ImageNet's glass offset 4 leaves no pixel to move.
IMAGES = {3: _RNG.uniform(size=(2, 32, 32, 3)).astype(np.float32),
          1: _RNG.uniform(size=(3, 8, 12, 1)).astype(np.float32)}
KEY = jax.random.key(5)


def fast_jit(fn, **kwargs):
    return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


def rows(name: str) -> list[tuple[str, int, tuple[float, ...]]]:
    return [(preset, s, P.corruption_params(name, s, preset))
            for preset in ("cifar", "imagenet") for s in P.SEVERITIES]


@functools.cache
def all_severities(name: str, channels: int) -> np.ndarray:
    """f32[10, N, H, W, C]: cifar then imagenet severities 1..5, one vmapped program, KEY."""
    params = np.concatenate([P.stacked_params(name, "cifar"), P.stacked_params(name, "imagenet")])
    fn = fast_jit(lambda x, p: jax.vmap(lambda q: P.perturb_by_param(x, name, q, KEY))(p))
    return np.asarray(fn(IMAGES[channels], params))


# ------------------------------------------------------------------ NumPy references


def ref_gaussian(x_HWC: np.ndarray, sigma: float) -> np.ndarray:
    """skimage.filters.gaussian(x, sigma, multichannel=True): mode nearest, truncate 4."""
    return ndi.gaussian_filter(x_HWC, (sigma, sigma, 0), mode="nearest", truncate=4.0)


def ref_glass_moves(x_HWC: np.ndarray, delta: int, passes: int, offset) -> np.ndarray:
    """The reference's loop; ``offset(i, h, w) -> (dx, dy)`` replaces np.random.randint.
    On an H x W x C array the swap line assigns through views: a copy (numpy does it)."""
    x = x_HWC.copy()
    height, width = x.shape[:2]
    for i in range(passes):
        for h in range(height - delta, delta, -1):
            for w in range(width - delta, delta, -1):
                dx, dy = offset(i, h, w)
                h_prime, w_prime = h + dy, w + dx
                x[h, w], x[h_prime, w_prime] = x[h_prime, w_prime], x[h, w]
    return x


def drawn_offset(uniforms_PNHW2: np.ndarray, n: int, delta: int):
    """(dx, dy) of visit (pass i, h, w) of image n as glass_sources makes them from its
    uniforms: floor(2 d u) - d, in float32."""
    def offset(i: int, h: int, w: int) -> tuple[int, int]:
        u = uniforms_PNHW2[i, n, h, w].astype(np.float32)
        dx, dy = np.clip(np.floor(u * np.float32(2 * delta)).astype(int) - delta, -delta, delta - 1)
        return int(dx), int(dy)

    return offset


def ref_shift(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """imagecorruptions' shift: roll by dx along the columns, the wrapped-in columns
    replaced by the edge column, then the same by dy along the rows."""
    out = np.roll(image, dx, axis=1)
    if dx > 0:
        out[:, :dx] = out[:, dx:dx + 1]
    elif dx < 0:
        out[:, dx:] = out[:, dx - 1:dx]
    out = np.roll(out, dy, axis=0)
    if dy > 0:
        out[:dy] = out[dy:dy + 1]
    elif dy < 0:
        out[dy:] = out[dy - 1:dy]
    return out


def ref_motion_blur(x_HW: np.ndarray, radius: int, sigma: float, angle: float) -> np.ndarray:
    """imagecorruptions' _motion_blur (ImageMagick's kernel), float64."""
    width = 2 * radius + 1
    kernel = np.exp(-np.arange(width) ** 2 / (2 * sigma**2)) / (np.sqrt(2 * np.pi) * sigma)
    kernel /= kernel.sum()
    point = (width * np.sin(np.deg2rad(angle)), width * np.cos(np.deg2rad(angle)))
    hypot = math.hypot(*point)
    out = np.zeros_like(x_HW, dtype=np.float64)
    for i in range(width):
        dy = -math.ceil(i * point[0] / hypot - 0.5)
        dx = -math.ceil(i * point[1] / hypot - 0.5)
        if abs(dy) >= x_HW.shape[0] or abs(dx) >= x_HW.shape[1]:
            break  # the motion left the image: the remaining taps are dropped
        out += kernel[i] * ref_shift(x_HW, dx, dy)
    return out


def ref_snow(x_HWC: np.ndarray, c: tuple[float, ...], normal_HW: np.ndarray,
             angle: float) -> np.ndarray:
    """make_cifar_c's snow (no 8-bit PNG round trips); np.random.normal(loc, scale) is
    loc + scale * z for the given unit normals z."""
    layer = c[0] + c[1] * normal_HW.astype(np.float64)
    layer = clipped_zoom(layer[..., np.newaxis], c[2])
    layer[layer < c[3]] = 0
    layer = np.clip(layer.squeeze(-1), 0, 1)
    layer = ref_motion_blur(layer, int(c[4]), c[5], angle)[..., np.newaxis]
    if x_HWC.shape[-1] == 3:
        gray = (x_HWC @ np.array([0.299, 0.587, 0.114]))[..., np.newaxis]  # cv2 RGB2GRAY
    else:
        gray = x_HWC
    x = c[6] * x_HWC + (1 - c[6]) * np.maximum(x_HWC, gray * 1.5 + 0.5)
    return np.clip(x + layer + np.rot90(layer, k=2), 0, 1)


# ------------------------------------------------------------- deterministic pieces


@fast_jit
def _sources(uniforms_PNHW2, delta, passes):
    _, n, h, w, _ = uniforms_PNHW2.shape
    return blur.glass_sources(jnp.zeros((n, 2), jnp.uint32), h, w, delta, passes,
                              lambda i: uniforms_PNHW2[i])


@pytest.mark.parametrize("h, w, cases", [
    (8, 8, [(1, 1), (1, 2), (3, 1), (4, 2)]),  # digits; offset 4: nothing moves
    (9, 13, [(1, 2), (2, 3)]),  # not square
    (28, 28, [(1, 1), (3, 2)]),  # MNIST
    (32, 32, [(1, 2), (2, 3)]),  # CIFAR
])
def test_glass_moves_equal_the_sequential_loop(h: int, w: int, cases) -> None:
    # The JAX code resolves a pass's chains of copies at once; the reference visits one
    # pixel at a time, each visit seeing the ones before: the same source of every pixel,
    # for the same offsets.
    n = 2
    uniforms = np.random.default_rng(h * w).uniform(size=(3, n, h, w, 2)).astype(np.float32)
    index = np.arange(h * w).reshape(h, w, 1)
    for d, passes in cases:
        got = np.asarray(_sources(uniforms, jnp.int32(d), jnp.int32(passes)))
        for m in range(n):
            want = ref_glass_moves(index, d, passes, drawn_offset(uniforms, m, d))
            np.testing.assert_array_equal(got[m].reshape(h, w), want[..., 0],
                                          err_msg=f"{h}x{w} d={d} passes={passes} image {m}")
            if 2 * d >= min(h, w) - 1:
                np.testing.assert_array_equal(want[..., 0], index[..., 0])  # nothing to move


def test_glass_moves_copy_a_neighbour_as_the_reference_does() -> None:
    # The reference's swap line on H x W x C: (h, w) takes its neighbour's value and the
    # neighbour keeps its own, so values repeat and others vanish: not a permutation.
    x = np.arange(6 * 6 * 3).reshape(6, 6, 3)
    moved = ref_glass_moves(x, 1, 1, lambda i, h, w: (-1, 0))  # every visit reads (h, w - 1)
    np.testing.assert_array_equal(moved[2:, 2:], x[2:, 1:5])  # w descends: reads the original
    np.testing.assert_array_equal(moved[2:, 1], x[2:, 1])
    src = np.asarray(_sources(np.full((1, 1, 6, 6, 2), 0.25, np.float32), jnp.int32(1),
                              jnp.int32(1)))[0].reshape(6, 6)  # dx = dy = -1
    want = np.arange(36).reshape(6, 6)
    want[2:, 2:] = want[1:5, 1:5].copy()
    np.testing.assert_array_equal(src, want)
    assert len(np.unique(src)) < 36
    # dx = dy = 0 (u = 1/2 at d = 1): every visit copies itself, nothing moves.
    src = _sources(np.full((1, 1, 6, 6, 2), 0.5, np.float32), jnp.int32(1), jnp.int32(1))
    np.testing.assert_array_equal(src[0], np.arange(36))
    # d = 2, dx = dy = +1 (u = .99): each visit reads a pixel visited just before it, whose
    # value came the same way: chains of copies to the first unvisited pixel (row or
    # column 7 of 8), all in one pass.
    src = np.asarray(_sources(np.full((1, 1, 8, 8, 2), 0.99, np.float32), jnp.int32(2),
                              jnp.int32(1)))[0].reshape(8, 8)
    want = np.arange(64).reshape(8, 8)
    for h in range(3, 7):
        for w in range(3, 7):
            t = min(7 - h, 7 - w)
            want[h, w] = (h + t) * 8 + w + t
    np.testing.assert_array_equal(src, want)


@functools.partial(fast_jit)
def _motion(x, radius, sigma, angles):
    return blur.motion_blur_images(x, radius, sigma, angles)


@pytest.mark.parametrize("shape", [(8, 8, 1), (9, 12, 3), (28, 28, 1)])
def test_motion_kernel_matches_imagecorruptions(shape) -> None:
    # Not 30 or 60 degrees: i sin(a) - 1/2 hits a whole number there, whose ceil the last
    # bit of float64's sin decides (the corruptions draw angles at random: probability 0).
    angles = np.array([-135, -121.7, -90, -58.2, -45, -17.3, 0, 31.3, 44.9, 45], np.float32)
    x = np.random.default_rng(sum(shape)).uniform(size=(len(angles), *shape)).astype(np.float32)
    kernels = {(c[0], c[1]) for _, _, c in rows("motion_blur")}
    kernels |= {(c[4], c[5]) for _, _, c in rows("snow")}
    for radius, sigma in sorted(kernels):
        got = np.asarray(_motion(x, np.float32(radius), np.float32(sigma), angles))
        for m, angle in enumerate(angles):
            want = np.stack([ref_motion_blur(x[m, ..., k].astype(np.float64), int(radius), sigma,
                                             float(angle)) for k in range(shape[-1])], -1)
            np.testing.assert_allclose(got[m], want, atol=1e-5,
                                       err_msg=f"{shape} r={radius} s={sigma} angle={angle}")


def test_motion_blur_radius_zero_is_the_identity() -> None:
    x = IMAGES[1]
    got = _motion(x, np.float32(0), np.float32(1), np.zeros(len(x), np.float32))
    np.testing.assert_allclose(got, x, atol=1e-7)


# ------------------------------------------------------------ the corruptions, end to end


@pytest.mark.parametrize("channels", [3, 1])
def test_glass_blur_reference(channels: int) -> None:
    x = IMAGES[channels].astype(np.float64)
    n, h, w, _ = x.shape
    keys = jax.random.split(KEY, n)
    passes = max(int(c[2]) for _, _, c in rows("glass_blur"))
    uniforms = np.asarray(fast_jit(jax.vmap(lambda i: blur.glass_uniforms(keys, i, h, w)))(
        jnp.arange(passes)))
    out = all_severities("glass_blur", channels)
    for row, (preset, s, c) in enumerate(rows("glass_blur")):
        d, passes = int(c[1]), int(c[2])
        want = np.stack([np.clip(ref_gaussian(ref_glass_moves(
            ref_gaussian(x[m], c[0]), d, passes, drawn_offset(uniforms, m, d)), c[0]),
            0, 1) for m in range(n)])
        np.testing.assert_allclose(out[row], want, atol=2e-5, err_msg=f"{preset} s{s}")


@functools.partial(fast_jit, static_argnames=("n",))
def motion_angles(key, n):
    return jax.random.uniform(key, (n,), minval=-45.0, maxval=45.0)


@functools.partial(fast_jit, static_argnames=("n", "h", "w"))
def snow_draws(key, n, h, w):
    k_layer, k_angle = jax.random.split(key)
    return (jax.random.normal(k_layer, (n, h, w)),
            jax.random.uniform(k_angle, (n,), minval=-135.0, maxval=-45.0))


@pytest.mark.parametrize("channels", [3, 1])
def test_motion_blur_reference(channels: int) -> None:
    # White box: one angle U(-45, 45) per image from the key.
    x = IMAGES[channels].astype(np.float64)
    angles = np.asarray(motion_angles(KEY, len(x)))
    out = all_severities("motion_blur", channels)
    for row, (preset, s, (radius, sigma)) in enumerate(rows("motion_blur")):
        want = np.stack([np.stack([ref_motion_blur(x[m, ..., k], int(radius), sigma,
                                                   float(angles[m]))
                                   for k in range(channels)], -1) for m in range(len(x))])
        np.testing.assert_allclose(out[row], np.clip(want, 0, 1), atol=2e-5,
                                   err_msg=f"{preset} s{s}")


@pytest.mark.parametrize("channels", [3, 1])
def test_snow_reference(channels: int) -> None:
    # White box: the key splits into the layer's normals f32[N, H, W] and the angles
    # U(-135, -45) f32[N]. Severity 5 of cifar at 32 px holds the zoom tie 26 * 1.25 = 32.5
    # (scipy rounds the size to 32).
    x = IMAGES[channels].astype(np.float64)
    n, h, w, _ = x.shape
    normals, angles = map(np.asarray, snow_draws(KEY, n, h, w))
    out = all_severities("snow", channels)
    for row, (preset, s, c) in enumerate(rows("snow")):
        want = np.stack([ref_snow(x[m], c, normals[m], float(angles[m])) for m in range(n)])
        np.testing.assert_allclose(out[row], want, atol=5e-5, err_msg=f"{preset} s{s}")


def test_snow_blend_of_one_channel_uses_the_image_as_gray() -> None:
    x = jnp.asarray(IMAGES[1])
    layer = jnp.zeros(x.shape[:3])
    got = weather.snow_blend(x, layer, jnp.float32(0.8))
    np.testing.assert_allclose(got, 0.8 * x + 0.2 * jnp.maximum(x, 1.5 * x + 0.5), atol=1e-6)


@pytest.mark.parametrize("name", ["glass_blur", "motion_blur", "snow"])
def test_static_severity_under_jit_equals_the_vmapped_program(name: str) -> None:
    jitted = fast_jit(P.perturb, static_argnames=("name", "severity", "preset"))
    got = jitted(IMAGES[1], name=name, severity=5, key=KEY, preset="imagenet")
    np.testing.assert_allclose(got, all_severities(name, 1)[9], atol=2e-6)


# ------------------------------------------------------------------------ parameters


def test_presets_are_the_reference_rows() -> None:
    assert P.corruption_params("glass_blur", 1, "cifar") == (0.05, 1.0, 1.0)
    assert P.corruption_params("glass_blur", 5, "imagenet") == (1.5, 4.0, 2.0)
    assert P.corruption_params("motion_blur", 4, "cifar") == (8.0, 2.0)
    assert P.corruption_params("motion_blur", 5, "imagenet") == (20.0, 15.0)
    assert P.corruption_params("snow", 5, "cifar") == (0.3, 0.3, 1.25, 0.65, 14.0, 12.0, 0.8)
    assert P.corruption_params("snow", 3, "imagenet") == (0.55, 0.3, 4.0, 0.9, 12.0, 8.0, 0.7)
    for name in ("glass_blur", "motion_blur", "snow"):
        for preset in P.PRESETS:
            np.testing.assert_array_equal(P.stacked_params(name, preset),
                                          np.float32(P.PRESETS[preset][name]))


@pytest.mark.parametrize("name, params, match", [
    ("glass_blur", (0, 1, 1), "sigma"),
    ("glass_blur", (9, 1, 1), "sigma"),
    ("glass_blur", (0.5, 0, 1), "whole max offset"),
    ("glass_blur", (0.5, 1.5, 1), "whole max offset"),
    ("glass_blur", (0.5, 1, 0), "passes"),
    ("glass_blur", (0.5, 1), "3 parameter"),
    ("motion_blur", (-1, 1), "whole radius"),
    ("motion_blur", (2.5, 1), "whole radius"),
    ("motion_blur", (3, 0), "sigma > 0"),
    ("snow", (0.1, -0.2, 1, 0.6, 8, 3, 0.95), "scale >= 0"),
    ("snow", (0.1, 0.2, 0.9, 0.6, 8, 3, 0.95), "zoom >= 1"),
    ("snow", (0.1, 0.2, 1, 0.6, 8.5, 3, 0.95), "whole radius"),
    ("snow", (0.1, 0.2, 1, 0.6, 8, 0, 0.95), "sigma > 0"),
    ("snow", (0.1, 0.2, 1, 0.6, 8, 3, 1.5), "blend"),
])
def test_param_array_bounds(name: str, params, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        P.param_array(name, params)
    if len(params) == len(P.PRESETS["cifar"][name][0]):
        with pytest.raises(ValueError, match=match):
            P.perturb(IMAGES[1], name, 1, KEY, params=params)
