"""JPEG compression, the one reference corruption that JAX cannot express: Pillow encodes
and decodes on the host. ``perturb`` calls it from inside a compiled program
(``jax.pure_callback``, so it works under jit and vmap); the suite instead corrupts each
chunk on the host before it goes to the devices (``image_sets``), since a callback in a
program sharded over several devices runs on one of them, with the whole batch
gathered there.

The reference (``make_cifar_c.py``) saves the uint8 PIL image as JPEG at quality ``c``
and reads it back; here float images in [0, 1] are rounded to uint8 first (exact for
images that came from uint8) and the result is divided by 255. Pillow's encoder
defaults (4:2:0 chroma subsampling, as the reference's) apply; one channel is encoded
as a greyscale JPEG. Deterministic: no key.
"""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def jpeg_u8(images_NHWC: np.ndarray, quality: float) -> np.ndarray:
    """Each image of ``[N, H, W, C]`` (float in [0, 1], C = 1 or 3) through a JPEG at
    ``quality`` (1..95 useful; rounded to an int): the decoded ``u8[N, H, W, C]``."""
    from PIL import Image  # a matplotlib dependency; imported where it is used

    q = int(np.clip(np.rint(quality), 1, 100))
    u8 = np.rint(np.clip(np.asarray(images_NHWC, np.float32), 0.0, 1.0) * 255).astype(np.uint8)
    out = np.empty_like(u8)
    for n, img in enumerate(u8):
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, "JPEG", quality=q)
        out[n] = np.asarray(Image.open(buf)).reshape(img.shape)
    return out


def jpeg_host(images_NHWC: np.ndarray, quality: float) -> np.ndarray:
    """``jpeg_u8`` as f32 in [0, 1] (``u8 / 255``)."""
    return jpeg_u8(images_NHWC, quality).astype(np.float32) / np.float32(255.0)


def image_sets(images_NHWC: np.ndarray, qualities: np.ndarray) -> np.ndarray:
    """``u8[N, V, H, W, C]``: the images at each of ``V`` qualities (``image_sets_program``
    scales them by 1/255 as ``jpeg_host`` does, so both give the same pixels)."""
    return np.stack([jpeg_u8(images_NHWC, q) for q in np.ravel(qualities)], axis=1)


def jpeg_compression(x: Array, p: Array, key: Array) -> Array:
    """``jpeg_host`` at quality ``p[0]`` as a step of a JAX program (host round trip;
    under ``jax.vmap`` one host call per vmapped element)."""
    del key
    shape = jax.ShapeDtypeStruct(x.shape, jnp.float32)
    return jax.pure_callback(jpeg_host, shape, x, p[0], vmap_method="sequential")
