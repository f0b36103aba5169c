"""Tests for jaxtrain.robustness.perturbations.

Deterministic corruptions are checked against independent numpy / scipy / colorsys /
PIL code, noise by its statistics, and every corruption for the contract (shape,
dtype, range, keys, monotone severity). One compiled program per corruption and
image shape runs all ten preset severities (cifar then imagenet) for eight keys;
its result is cached and shared by the tests.

Test programs are compiled with XLA's backend optimizations off (FAST_COMPILE): on
XLA:CPU that compiles threefry and shot noise's sampler several times faster, and
eager (op-by-op) calls would compile every op separately.
"""

from __future__ import annotations

import colorsys
import functools
import io
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi

from jaxtrain.robustness import perturbations as P
from jaxtrain.robustness.evaluator import FAST_COMPILE  # as the suite compiles on CPU

NAMES = P.CORRUPTIONS
RANDOM = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "glass_blur",
          "motion_blur", "fog", "snow", "elastic_transform", "rotation", "translation",
          "occlusion")
# Parameters that do not grow with severity: saturate's factor goes .3, .1, 1.5, ...;
# fog's decay changes with its amplitude; ImageNet's zoom sets are not nested (12, 16,
# 11, 13, 11 factors) and its defocus radii 3..10 exceed these small images.
# PIL's BOX up-sampling is not aligned with its down-sampling groups unless the size
# divides: at 20 px, 6 groups distort noise images more than 5 (ImageNet's last two).
# The elastic transform's severities trade displacement against its smoothness: on noise
# images any shift of a pixel distorts about as much.
# Glass blur's sigma alternates (cifar .25, .4, .25, .4), and a wider blur after the moves
# pulls a noise image's pixels back towards their mean; ImageNet's glass offsets 3 and 4
# move only the inner 6x6 or 4x4 pixels of these 12 px images. ImageNet's snow thresholds
# its layer at .5, .5, .9, .85, .85 (severity 3 has fewer flakes than 2).
NOT_MONOTONE = {("glass_blur", "cifar"), ("glass_blur", "imagenet"), ("snow", "imagenet"),
                ("saturate", "cifar"), ("saturate", "imagenet"), ("fog", "cifar"),
                ("fog", "imagenet"), ("zoom_blur", "imagenet"), ("defocus_blur", "imagenet"),
                ("pixelate", "imagenet"), ("elastic_transform", "cifar"),
                ("elastic_transform", "imagenet")}
PRESET_ROWS = {"cifar": slice(0, 5), "imagenet": slice(5, 10)}

_RNG = np.random.default_rng(1234)
# Sizes where the reference's zoom geometry has no float64-dependent tie (see
# test_zoom_blur_reference); 12 px still shifts >= 1 px at translation severity 1.
IMAGES = {3: _RNG.uniform(size=(4, 12, 12, 3)).astype(np.float32),
          1: _RNG.uniform(size=(2, 12, 20, 1)).astype(np.float32)}


def key(seed: int = 0) -> jax.Array:
    return jax.random.key(seed)


def sweep_keys() -> jax.Array:
    """Keys k0, k1, k0 again, k2, ..., k6: a repeated key, and more noise samples."""
    return jax.random.split(key(11), 7)[jnp.array([0, 1, 0, 2, 3, 4, 5, 6])]


DISTINCT_KEYS = [0, 1, 3, 4, 5, 6, 7]


def all_params(name: str) -> np.ndarray:
    """f32[10, P]: cifar severities 1..5, then imagenet 1..5."""
    return np.concatenate([P.stacked_params(name, "cifar"), P.stacked_params(name, "imagenet")])


def fast_jit(fn, **kwargs):
    return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


@functools.partial(fast_jit, static_argnames=("name", "per_severity"))
def _sweep(images: jax.Array, name: str, params: jax.Array, keys: jax.Array,
           per_severity: bool) -> tuple[jax.Array, ...]:
    """f32[K, 10, N, H, W, C]: every key x every stacked parameter vector; with
    `per_severity` also f32[5, N, H, W, C]: perturb at cifar severities 1..5 one at a time
    (lax.map: unbatched, severity traced), key 0."""
    def per_key(k: jax.Array) -> jax.Array:
        return jax.vmap(lambda p: P.perturb_by_param(images, name, p, k))(params)
    swept = jax.vmap(per_key)(keys)
    if not per_severity:
        return (swept,)
    one_at_a_time = jax.lax.map(lambda s: P.perturb(images, name, s, keys[0], preset="cifar"),
                                jnp.arange(1, 6))
    return swept, one_at_a_time


@functools.cache
def _run(name: str, channels: int) -> tuple[np.ndarray, ...]:
    out = _sweep(IMAGES[channels], name, all_params(name), sweep_keys(),
                 per_severity=channels == 1)
    return tuple(np.asarray(o) for o in out)


def sweep(name: str, channels: int) -> np.ndarray:
    return _run(name, channels)[0]


def severity_params(name: str) -> list[tuple[str, int, tuple[float, ...]]]:
    """(preset, severity, ROBUSTNESS.md tuple) in sweep order."""
    return [(preset, s, P.corruption_params(name, s, preset))
            for preset in ("cifar", "imagenet") for s in P.SEVERITIES]


# ------------------------------------------------------------------ contract


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("name", NAMES)
def test_contract_all_severities(name: str, channels: int) -> None:
    x = IMAGES[channels]
    out = sweep(name, channels)
    assert out.shape == (8, 10, *x.shape) and out.dtype == np.float32
    assert np.all(np.isfinite(out)) and out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_array_equal(out[0], out[2], err_msg="same key, different output")
    differs = np.any(out[0] != out[1], axis=(1, 2, 3, 4))
    if name in RANDOM:
        assert differs.all(), f"two keys gave the same {name} at rows {np.flatnonzero(~differs)}"
    else:
        assert not differs.any(), f"{name} depends on the key"
    distortion = np.abs(out[0] - x).mean(axis=(1, 2, 3, 4))
    if not (name == "saturate" and channels == 1):
        assert distortion.min() > 0, f"{name} left some severity unchanged: {distortion}"
    for preset, rows in PRESET_ROWS.items():
        d = distortion[rows]
        if (name, preset) not in NOT_MONOTONE:
            assert np.all(np.diff(d) >= -1e-6), f"{name}/{preset} distortion not monotone: {d}"


@pytest.mark.parametrize("name", NAMES)
def test_perturb_per_severity_equals_vmapped_perturb_by_param(name: str) -> None:
    swept, one_at_a_time = _run(name, 1)
    np.testing.assert_allclose(one_at_a_time, swept[0, PRESET_ROWS["cifar"]], atol=2e-6)


@pytest.mark.parametrize("name, preset", [("contrast", "cifar"), ("defocus_blur", "imagenet")])
def test_jit_with_static_severity(name: str, preset: str) -> None:
    jitted = jax.jit(P.perturb, static_argnames=("name", "severity", "preset"),
                     compiler_options=FAST_COMPILE)
    swept = sweep(name, 1)[0, PRESET_ROWS[preset]]
    severities = P.SEVERITIES if name == "contrast" else (5,)  # r = 10: the 5x5 alias blur
    for s in severities:
        got = jitted(IMAGES[1], name=name, severity=s, key=sweep_keys()[0], preset=preset)
        np.testing.assert_allclose(got, swept[s - 1], atol=2e-6)


def test_traced_severity_and_raw_keys() -> None:
    x = IMAGES[3]
    raw_keys = jax.random.key_data(sweep_keys()[:2])  # legacy uint32[2, 2] keys, same bits
    traced = fast_jit(jax.vmap(lambda k, s: P.perturb(x, "gaussian_noise", s, k, "imagenet"),
                               in_axes=(0, None)))
    want = sweep("gaussian_noise", 3)[:2, PRESET_ROWS["imagenet"]]
    for s in P.SEVERITIES:
        np.testing.assert_allclose(traced(raw_keys, s), want[:, s - 1], atol=1e-6)


def test_vmap_over_images_applies_per_batch() -> None:
    batches = np.stack([IMAGES[3], IMAGES[3][::-1]])
    fn = lambda images: P.perturb(images, "occlusion", 4, key())
    vmapped, looped = fast_jit(lambda b: (jax.vmap(fn)(b), jnp.stack([fn(b[0]), fn(b[1])])))(
        batches)
    np.testing.assert_allclose(vmapped, looped, atol=1e-6)


def test_bfloat16_images_keep_dtype() -> None:
    out = fast_jit(lambda x: P.perturb(x, "contrast", 2, key()))(IMAGES[1].astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16 and out.shape == IMAGES[1].shape
    np.testing.assert_allclose(out.astype(np.float32), sweep("contrast", 1)[0, 1], atol=1e-2)


# ------------------------------------------------------------- parameters


def test_preset_values_match_robustness_md() -> None:
    assert P.corruption_params("gaussian_noise", 3, "cifar") == (0.08,)
    assert P.corruption_params("shot_noise", 5, "imagenet") == (3.0,)
    assert P.corruption_params("defocus_blur", 5, "imagenet") == (10.0, 0.5)
    assert P.corruption_params("saturate", 4, "cifar") == (2.0, 0.1)
    assert P.corruption_params("zoom_blur", 5, "imagenet") == (1.0, 1.31, 0.03)
    assert P.corruption_params("fog", 1, "imagenet") == (1.5, 2.0)
    np.testing.assert_allclose(P.corruption_params("elastic_transform", 2, "cifar"),
                               (1.6, 6.4, 2.24))
    np.testing.assert_allclose(P.corruption_params("elastic_transform", 1, "imagenet"),
                               (488, 170.8, 24.4))
    assert P.corruption_params("jpeg_compression", 3, "cifar") == (58.0,)
    assert P.corruption_params("jpeg_compression", 5, "imagenet") == (7.0,)
    assert set(P.PRESETS) == {"cifar", "imagenet"}
    for preset in P.PRESETS:
        assert tuple(P.PRESETS[preset]) == NAMES
        assert all(len(rows) == 5 for rows in P.PRESETS[preset].values())


def test_zoom_param_is_the_reference_arange() -> None:
    # np.arange(1, 1.06, .01) has 7 factors (1.06 included): the reference's float64 quirk.
    zooms = P.param_array("zoom_blur", (1, 1.06, 0.01))
    assert zooms.shape == (P.MAX_ZOOMS,)
    np.testing.assert_array_equal(zooms[:7], np.arange(1, 1.06, 0.01).astype(np.float32))
    assert np.all(zooms[7:] == 0)


def test_params_override_preset() -> None:
    k = key()
    table = [(0.9,), (0.8,), (0.5,), (0.2,), (0.1,)]
    outs = fast_jit(lambda x: (
        P.perturb(x, "contrast", 2, k),
        P.perturb(x, "contrast", 4, k, params=(0.5,)),  # one tuple: any severity
        P.perturb(x, "contrast", 3, k, params=table),  # one tuple per severity
        P.perturb(x, "saturate", 4, k),
        P.perturb(x, "saturate", 1, k, params=(2, 0.1)),
    ))(IMAGES[3])
    np.testing.assert_array_equal(outs[1], outs[0])
    np.testing.assert_array_equal(outs[2], outs[0])
    np.testing.assert_array_equal(outs[4], outs[3])
    assert np.any(outs[0] != outs[3])


@pytest.mark.parametrize("call, match", [
    (lambda: P.perturb(IMAGES[1], "contrast", 0, key()), "1, 2, 3, 4, 5"),
    (lambda: P.perturb(IMAGES[1], "contrast", 6, key()), "1, 2, 3, 4, 5"),
    (lambda: P.perturb(IMAGES[1], "contrast", 2.5, key()), "1, 2, 3, 4, 5"),
    (lambda: P.perturb(IMAGES[1], "contrast", True, key()), "1, 2, 3, 4, 5"),
    (lambda: P.perturb(IMAGES[1], "blur", 1, key()), "gaussian_noise, shot_noise"),
    (lambda: P.perturb(IMAGES[1], "contrast", 1, key(), preset="mnist"), "cifar, imagenet"),
    (lambda: P.corruption_params("contrast", 9, "cifar"), "1, 2, 3, 4, 5"),
    (lambda: P.perturb(np.zeros((1, 4, 4, 2), np.float32), "contrast", 1, key()), "C in"),
    (lambda: P.perturb(np.zeros((4, 4, 3), np.float32), "contrast", 1, key()), "N, H, W, C"),
    (lambda: P.perturb(np.zeros((1, 4, 4, 3), np.uint8), "contrast", 1, key()), "float"),
    (lambda: P.perturb_by_param(IMAGES[1], "fog", np.ones(3), key()), "2 value"),
    (lambda: P.perturb(IMAGES[1], "defocus_blur", 1, key(), params=(11, 0.5)), "radius"),
    (lambda: P.perturb(IMAGES[1], "zoom_blur", 1, key(), params=(1, 2, 0.01)), "zoom"),
    (lambda: P.perturb(IMAGES[1], "gaussian_blur", 1, key(), params=(9,)), "sigma"),
    (lambda: P.perturb(IMAGES[1], "contrast", 1, key(), params=(1, 2)), "params"),
    (lambda: P.perturb(IMAGES[1], "elastic_transform", 1, key(), params=(1, 171, 1)), "sigma"),
    (lambda: P.perturb(IMAGES[1], "jpeg_compression", 1, key(), params=(0,)), "quality"),
])
def test_bad_input_raises_value_error(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------- references: deterministic


def per_row(name: str, channels: int, reference) -> None:
    """Compares every sweep row with reference(x [f64], preset tuple)."""
    x = IMAGES[channels].astype(np.float64)
    out = sweep(name, channels)[0]
    for row, (preset, s, params) in enumerate(severity_params(name)):
        want = np.clip(reference(x, params), 0, 1)
        np.testing.assert_allclose(out[row], want, atol=2e-5, err_msg=f"{name} {preset} s{s}")


@pytest.mark.parametrize("channels", [3, 1])
def test_contrast_reference(channels: int) -> None:
    def ref(x, p):
        mean = x.mean(axis=(1, 2), keepdims=True)
        return (x - mean) * p[0] + mean
    per_row("contrast", channels, ref)


def hsv_map(x: np.ndarray, fn) -> np.ndarray:
    out = np.empty_like(x)
    for idx in np.ndindex(x.shape[:-1]):
        out[idx] = colorsys.hsv_to_rgb(*fn(*colorsys.rgb_to_hsv(*x[idx])))
    return out


def test_brightness_reference() -> None:
    per_row("brightness", 3,
            lambda x, p: hsv_map(x, lambda h, s, v: (h, s, np.clip(v + p[0], 0, 1))))
    per_row("brightness", 1, lambda x, p: x + p[0])


def test_saturate_reference() -> None:
    per_row("saturate", 3,
            lambda x, p: hsv_map(x, lambda h, s, v: (h, np.clip(s * p[0] + p[1], 0, 1), v)))
    per_row("saturate", 1, lambda x, p: x)


def test_hsv_conversions_match_colorsys() -> None:
    edge = [[0, 0, 0], [1, 1, 1], [.5, .5, .5], [1, 0, 0], [1, 1, 0], [0, 1, 1], [.2, .7, .7],
            [.7, .7, .2], [.7, .2, .7], [1, 0, 1e-6], [.3, .2, .2]]
    rgb = np.random.default_rng(5).uniform(size=(200, 3))
    rgb = np.concatenate([np.asarray(edge), rgb]).astype(np.float32)
    want = np.array([colorsys.rgb_to_hsv(*px) for px in rgb.astype(np.float64)])
    hsv, rgb_of_want, roundtrip = fast_jit(lambda a, b: (
        P.rgb_to_hsv(a), P.hsv_to_rgb(b), P.hsv_to_rgb(P.rgb_to_hsv(a))))(
        rgb, want.astype(np.float32))
    hue_gap = np.abs(hsv[:, 0] - want[:, 0])
    np.testing.assert_allclose(np.minimum(hue_gap, 1 - hue_gap), 0, atol=1e-6)
    np.testing.assert_allclose(hsv[:, 1:], want[:, 1:], atol=1e-6)
    back = np.array([colorsys.hsv_to_rgb(*px) for px in want])
    np.testing.assert_allclose(rgb_of_want, back, atol=1e-6)
    np.testing.assert_allclose(roundtrip, rgb, atol=1e-6)


@pytest.mark.parametrize("channels", [3, 1])
def test_gaussian_blur_reference(channels: int) -> None:
    per_row("gaussian_blur", channels, lambda x, p: ndi.gaussian_filter(
        x, sigma=(0, p[0], p[0], 0), mode="nearest", truncate=4.0))


def reference_disk(radius: float, alias_blur: float) -> np.ndarray:
    """make_cifar_c.disk, with cv2.GaussianBlur as scipy correlate in 'mirror' (reflect-101)."""
    grid = np.arange(-8, 9) if radius <= 8 else np.arange(-radius, radius + 1)
    xx, yy = np.meshgrid(grid, grid)
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    ksize = 3 if radius <= 8 else 5
    taps = np.exp(-((np.arange(ksize) - (ksize - 1) / 2) ** 2) / (2 * alias_blur**2))
    taps /= taps.sum()
    disk = ndi.correlate1d(disk, taps, axis=0, mode="mirror")
    return ndi.correlate1d(disk, taps, axis=1, mode="mirror")


@pytest.mark.parametrize("channels", [3, 1])
def test_defocus_blur_reference(channels: int) -> None:
    def ref(x, p):
        kernel = reference_disk(*p)
        out = np.empty_like(x)
        for n in range(x.shape[0]):
            for c in range(x.shape[-1]):
                out[n, :, :, c] = ndi.correlate(x[n, :, :, c], kernel, mode="mirror")
        return out
    per_row("defocus_blur", channels, ref)


def pil_box_weights(in_size: int, out_size: int) -> np.ndarray:
    """f64[out, in]: Pillow's precompute_coeffs for the BOX filter, transcribed."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    weights = np.zeros((out_size, in_size))
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        for x in range(xmin, xmax):
            t = (x - center + 0.5) / filterscale
            weights[xx, x] = 1.0 if -0.5 < t <= 0.5 else 0.0
        weights[xx] /= weights[xx].sum()
    return weights


@pytest.mark.parametrize("channels", [3, 1])
def test_pixelate_reference(channels: int) -> None:
    def ref(x, p):
        h, w = x.shape[1:3]
        rows = pil_box_weights(int(h * p[0]), h) @ pil_box_weights(h, int(h * p[0]))
        cols = pil_box_weights(int(w * p[0]), w) @ pil_box_weights(w, int(w * p[0]))
        return np.einsum("ih,jw,nhwc->nijc", rows, cols, x)
    per_row("pixelate", channels, ref)


@pytest.mark.parametrize("channels", [3, 1])
def test_pixelate_matches_pillow(channels: int) -> None:
    image = pytest.importorskip("PIL.Image")
    x = IMAGES[channels]
    h, w = x.shape[1:3]
    out = sweep("pixelate", channels)[0]
    for row, (preset, s, (c,)) in enumerate(severity_params("pixelate")):
        for n in range(x.shape[0]):
            small = image.fromarray(x[n, :, :, -1], mode="F").resize(
                (int(w * c), int(h * c)), image.BOX)
            want = np.asarray(small.resize((w, h), image.BOX))
            np.testing.assert_allclose(out[row, n, :, :, -1], want, atol=1e-5,
                                       err_msg=f"{preset} s{s}")


def clipped_zoom(img: np.ndarray, zoom: float) -> np.ndarray:
    """make_cifar_c.clipped_zoom of f64[H, W, C], per axis as in imagecorruptions."""
    h, w = img.shape[:2]
    ch, cw = int(np.ceil(h / zoom)), int(np.ceil(w / zoom))
    top, left = (h - ch) // 2, (w - cw) // 2
    img = ndi.zoom(img[top:top + ch, left:left + cw], (zoom, zoom, 1), order=1)
    trim_top, trim_left = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
    return img[trim_top:trim_top + h, trim_left:trim_left + w]


def reference_zoom_blur(x: np.ndarray, zooms: np.ndarray) -> np.ndarray:
    out = np.stack([img + sum(clipped_zoom(img, z) for z in zooms) for img in x])
    return out / (len(zooms) + 1)


@pytest.mark.parametrize("channels", [3, 1])
def test_zoom_blur_reference(channels: int) -> None:
    # The reference's float64 factors decide ties like 15 * 1.1 = 16.5 by their last bit;
    # the module rounds ties up, as the reference does for every preset factor at 32 and
    # 224 px and at these test sizes (not at, e.g., 16 px with z = 1.1).
    per_row("zoom_blur", channels, lambda x, p: reference_zoom_blur(x, np.arange(*p)))


def test_zoom_blur_reference_at_32px() -> None:
    # Cifar severity 5 holds the tie 26 * 1.25 = 32.5 (float64: 33).
    x = np.random.default_rng(6).uniform(size=(1, 32, 32, 3))
    params = P.corruption_params("zoom_blur", 5, "cifar")
    got = fast_jit(lambda images: P.perturb(images, "zoom_blur", 5, key()))(x.astype(np.float32))
    want = np.clip(reference_zoom_blur(x, np.arange(*params)), 0, 1)
    np.testing.assert_allclose(got, want, atol=2e-5)


def reference_plasma(uniforms: list[np.ndarray], decay: float) -> np.ndarray:
    """make_cifar_c.plasma_fractal with its np.random.uniform draws replaced by `uniforms`."""
    mapsize = 2 * uniforms[-1].shape[-1]
    maparray = np.empty((mapsize, mapsize))
    maparray[0, 0] = 0
    stepsize = mapsize
    wibble = 100.0

    def wibbledmean(array, draw):
        return array / 4 + wibble * (wibble * draw)

    for u in uniforms:
        cornerref = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        squareaccum = cornerref + np.roll(cornerref, shift=-1, axis=0)
        squareaccum += np.roll(squareaccum, shift=-1, axis=1)
        maparray[stepsize // 2:mapsize:stepsize,
                 stepsize // 2:mapsize:stepsize] = wibbledmean(squareaccum, u[0])
        drgrid = maparray[stepsize // 2:mapsize:stepsize, stepsize // 2:mapsize:stepsize]
        ulgrid = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        ltsum = drgrid + np.roll(drgrid, 1, axis=0) + ulgrid + np.roll(ulgrid, -1, axis=1)
        maparray[0:mapsize:stepsize, stepsize // 2:mapsize:stepsize] = wibbledmean(ltsum, u[1])
        ttsum = drgrid + np.roll(drgrid, 1, axis=1) + ulgrid + np.roll(ulgrid, -1, axis=0)
        maparray[stepsize // 2:mapsize:stepsize, 0:mapsize:stepsize] = wibbledmean(ttsum, u[2])
        stepsize //= 2
        wibble /= decay
    maparray -= maparray.min()
    return maparray / maparray.max()


@pytest.mark.parametrize("channels", [3, 1])
def test_fog_reference(channels: int) -> None:
    # White box: fog draws its fractals' uniforms with P._plasma_uniforms(key, size, N).
    x = IMAGES[channels].astype(np.float64)
    n, h, w = x.shape[:3]
    size = 1 << (max(h, w) - 1).bit_length()
    levels = fast_jit(lambda k: P._plasma_uniforms(k, size, n))(sweep_keys()[0])
    uniforms = [[np.asarray(u[i], np.float64) for u in levels] for i in range(n)]
    out = sweep("fog", channels)[0]
    for row, (preset, s, (a, decay)) in enumerate(severity_params("fog")):
        plasma = np.stack([reference_plasma(u, decay)[:h, :w] for u in uniforms])[..., None]
        peak = x.max(axis=(1, 2, 3), keepdims=True)
        want = np.clip((x + a * plasma) * peak / (peak + a), 0, 1)
        np.testing.assert_allclose(out[row], want, atol=5e-5, err_msg=f"{preset} s{s}")


# ------------------------------------------------------------ geometric


def test_rotation_by_90_degrees_is_rot90() -> None:
    x = IMAGES[3]
    out = np.asarray(fast_jit(P.perturb_by_param, static_argnames="name")(
        x, "rotation", np.array([90.0]), key()))
    for n in range(x.shape[0]):
        gaps = [np.abs(out[n] - np.rot90(x[n], k, axes=(0, 1))).max() for k in (1, -1)]
        assert min(gaps) < 1e-5, f"image {n}: not a quarter turn, gaps {gaps}"


def test_translation_is_an_integer_shift_of_the_expected_length() -> None:
    x = 0.05 + 0.95 * IMAGES[3]
    out = np.asarray(fast_jit(P.perturb_by_param, static_argnames="name")(
        x, "translation", np.array([0.25]), key()))
    for n in range(x.shape[0]):
        found = []
        for di in range(-6, 7):
            for dj in range(-6, 7):
                shifted = np.zeros_like(x[n])
                shifted[max(di, 0):12 + min(di, 0), max(dj, 0):12 + min(dj, 0)] = \
                    x[n, max(-di, 0):12 - max(di, 0), max(-dj, 0):12 - max(dj, 0)]
                if np.abs(shifted - out[n]).max() < 1e-6:
                    found.append((di, dj))
        assert len(found) == 1, f"image {n}: shifts matching {found}"
        assert 2 <= np.hypot(*found[0]) <= 4  # 0.25 * 12 = 3 px, rounded per axis


def test_occlusion_zeroes_one_nested_square_inside_the_image() -> None:
    x = IMAGES[3]
    out = sweep("occlusion", 3)[0]
    holes = (out == 0) & (x != 0)
    for row, (preset, s, (f,)) in enumerate(severity_params("occlusion")):
        side = round(f * 12)
        for n in range(x.shape[0]):
            hole = holes[row, n]
            assert np.all(hole == hole[..., :1]), "channels occluded differently"
            rows, cols = np.flatnonzero(hole[:, :, 0].any(1)), np.flatnonzero(hole[:, :, 0].any(0))
            assert hole[:, :, 0].sum() == side * side and len(rows) == len(cols) == side
            np.testing.assert_array_equal(out[row, n][~hole], x[n][~hole])
            if s > 1:
                assert np.all(holes[row - 1, n] <= hole), "squares are not nested"


def reference_elastic(img: np.ndarray, c: tuple[float, ...], jitter_32: np.ndarray,
                      u_dx: np.ndarray, u_dy: np.ndarray) -> np.ndarray:
    """make_cifar_c.elastic_transform with its draws given, in scipy alone: OpenCV's
    getAffineTransform / warpAffine (reflect-101) as a 3x3 solve and
    ndimage.affine_transform(mode="mirror"); centre (W // 2, H // 2) in (x, y)."""
    h, w, ch = img.shape
    s, cx, cy = min(h, w) // 3, w // 2, h // 2
    pts1 = np.array([[cx + s, cy + s], [cx + s, cy - s], [cx - s, cy - s]], np.float64)
    forward = np.linalg.solve(np.c_[pts1, np.ones(3)], pts1 + jitter_32).T  # (x, y) 2x3
    inv = np.linalg.inv(np.vstack([forward, [0, 0, 1]]))
    m_rc = np.array([[inv[1, 1], inv[1, 0]], [inv[0, 1], inv[0, 0]]])  # (row, col) order
    warped = np.stack([ndi.affine_transform(img[..., k], m_rc, (inv[1, 2], inv[0, 2]),
                                            order=1, mode="mirror") for k in range(ch)], -1)
    smooth = (lambda u: ndi.gaussian_filter(u, c[1], mode="reflect", truncate=3) * c[0])
    dx, dy = smooth(u_dx), smooth(u_dy)
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([ndi.map_coordinates(warped[..., k], [i + dy, j + dx], order=1,
                                         mode="reflect") for k in range(ch)], -1)


@pytest.mark.parametrize("channels", [3, 1])
def test_elastic_transform_reference(channels: int) -> None:
    # White box: one key split 3 ways, U(-1, 1) * jitter [N, 3, 2] then two U(-1, 1) [N, H, W].
    # ImageNet's sigmas (up to 170 px) on 12 px images read many reflections of the image.
    x = IMAGES[channels].astype(np.float64)
    n, h, w = x.shape[:3]
    k_aff, k_dx, k_dy = jax.random.split(sweep_keys()[0], 3)
    unit = lambda k, shape: np.asarray(jax.random.uniform(k, shape, minval=-1.0, maxval=1.0))
    u_aff, u_dx, u_dy = unit(k_aff, (n, 3, 2)), unit(k_dx, (n, h, w)), unit(k_dy, (n, h, w))
    out = sweep("elastic_transform", channels)[0]
    for row, (preset, s, c) in enumerate(severity_params("elastic_transform")):
        jitter = u_aff * np.float32(c[2])
        want = np.stack([reference_elastic(x[m], c, jitter[m], u_dx[m], u_dy[m])
                         for m in range(n)])
        np.testing.assert_allclose(out[row], np.clip(want, 0, 1), atol=5e-5,
                                   err_msg=f"{preset} s{s}")


@pytest.mark.parametrize("channels", [3, 1])
def test_jpeg_compression_matches_pillow(channels: int) -> None:
    from PIL import Image

    u8 = np.rint(IMAGES[channels] * 255).astype(np.uint8)
    out = np.asarray(fast_jit(lambda x: jax.vmap(lambda p: P.perturb_by_param(
        x, "jpeg_compression", p, key()))(all_params("jpeg_compression")))(u8 / np.float32(255)))
    for row, (preset, s, (quality,)) in enumerate(severity_params("jpeg_compression")):
        for m, img in enumerate(u8):
            buf = io.BytesIO()
            Image.fromarray(img.squeeze(-1) if channels == 1 else img).save(
                buf, "JPEG", quality=int(quality))
            want = np.asarray(Image.open(buf)).reshape(img.shape) / np.float32(255)
            np.testing.assert_array_equal(out[row, m], want, err_msg=f"{preset} s{s}")


# ------------------------------------------------------------- noise stats


def noise_rows(name: str, value: float, max_c: float) -> list[tuple[float, np.ndarray]]:
    """(c, samples f32[7, N, H, W, C]) for constant images `value`, severities c <= max_c."""
    x = np.full(IMAGES[3].shape, value, np.float32)
    out = _sweep(x, name, all_params(name), sweep_keys(), per_severity=False)[0]
    out = np.asarray(out)[DISTINCT_KEYS]
    cs = all_params(name)[:, 0]
    return [(float(c), out[:, row]) for row, c in enumerate(cs) if c <= max_c]


def test_gaussian_noise_std() -> None:
    for c, out in noise_rows("gaussian_noise", 0.5, max_c=0.12):
        delta = out - 0.5
        assert abs(delta.std() / c - 1) < 5 / np.sqrt(2 * delta.size), c
        assert abs(delta.mean()) < 5 * c / np.sqrt(delta.size), c


def test_shot_noise_mean_and_variance() -> None:
    x = 0.3
    for c, out in noise_rows("shot_noise", x, max_c=float("inf")):
        if c < 12:  # x * c too small: clipping at 1 biases the moments
            continue
        assert abs(out.mean() - x) < 5 * np.sqrt(x / c / out.size), c
        assert abs(out.var() / (x / c) - 1) < 5 * np.sqrt(2 / out.size), c


def test_impulse_noise_fraction_balance_and_independent_salt() -> None:
    rows = noise_rows("impulse_noise", 0.5, max_c=1.0)
    for c, out in rows:
        changed = out != 0.5
        assert np.all((out == 0) | (out == 1) | ~changed)
        frac = changed.mean()
        assert abs(frac - c) < 5 * np.sqrt(c * (1 - c) / out.size), (c, frac)
        ones = (out[changed] == 1).mean()
        assert abs(ones - 0.5) < 5 * np.sqrt(0.25 / changed.sum()), (c, ones)
    # One key: the mask grows with c and the salt/pepper choice has its own key, so a
    # value hit at a lower severity is hit, with the same 0 or 1, at every higher one.
    for preset_rows in (rows[:5], rows[5:]):
        for (_, low), (_, high) in itertools.pairwise(preset_rows):
            hit = low != 0.5
            assert np.all(high[hit] == low[hit])


def test_speckle_noise_std() -> None:
    x = 0.3
    for c, out in noise_rows("speckle_noise", x, max_c=0.2):
        delta = out - x
        assert abs(delta.std() / (x * c) - 1) < 5 / np.sqrt(2 * delta.size), c
