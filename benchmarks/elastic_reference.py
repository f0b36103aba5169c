"""``elastic_transform`` against the reference code itself (OpenCV + scipy), same draws.

    pip install opencv-python-headless   # not a jaxtrain dependency; only this check needs it
    python -m benchmarks.elastic_reference [--out benchmarks/results]

The reference is ``make_cifar_c.py``'s ``elastic_transform`` (the same in
``make_imagenet_c.py`` with its parameters): ``cv2.getAffineTransform`` /
``cv2.warpAffine`` (reflect-101), ``skimage``'s gaussian (``scipy.ndimage``,
reflect, truncate 3) and ``scipy.ndimage.map_coordinates`` (order 1, reflect), fed
the uniform draws that jaxtrain takes from its key. Prints the largest and mean
absolute difference per preset and severity, on smooth and on noise images, 3 or 1
channels, and writes them as JSON. The unit tests compare with scipy alone
(``tests/test_perturbations.py``), so they run without OpenCV.
"""

from __future__ import annotations

import argparse
import json
import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def draws(key, n: int, h: int, w: int, jitter: float):
    """The affine jitter ``[N, 3, 2]`` and the two displacement uniforms ``[N, H, W]``
    that ``geometric.elastic_transform`` draws from ``key``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    k_aff, k_dx, k_dy = jax.random.split(key, 3)
    unit = lambda k, shape: jax.random.uniform(k, shape, minval=-1.0, maxval=1.0)
    jit = np.asarray(unit(k_aff, (n, 3, 2)) * jnp.float32(jitter))
    return jit, np.asarray(unit(k_dx, (n, h, w)), np.float64), np.asarray(
        unit(k_dy, (n, h, w)), np.float64)


def reference(image, c, jitter, u_dx, u_dy):
    """make_cifar_c.elastic_transform on one float image with its random draws given."""
    import cv2
    import numpy as np
    from scipy.ndimage import gaussian_filter, map_coordinates

    image = image.astype(np.float32)
    shape = image.shape
    size = shape[:2]
    center = np.float32(size) // 2
    square = min(size) // 3
    pts1 = np.float32([center + square, [center[0] + square, center[1] - square],
                       center - square])
    warp = cv2.getAffineTransform(pts1, (pts1 + jitter).astype(np.float32))
    image = cv2.warpAffine(image, warp, size[::-1], borderMode=cv2.BORDER_REFLECT_101)
    if image.ndim == 2:
        image = image[..., None]

    def field(u):  # skimage.filters.gaussian skips sigma 0, as scipy does
        smooth = gaussian_filter(u, c[1], mode="reflect", truncate=3) if c[1] > 0 else u
        return (smooth * c[0]).astype(np.float32)[..., None]

    dx, dy = field(u_dx), field(u_dy)
    x, y, z = np.meshgrid(np.arange(shape[1]), np.arange(shape[0]), np.arange(shape[2]))
    where = (np.reshape(y + dy, (-1, 1)), np.reshape(x + dx, (-1, 1)), np.reshape(z, (-1, 1)))
    return np.clip(map_coordinates(image, where, order=1, mode="reflect").reshape(shape), 0, 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    try:
        import cv2
    except ImportError:
        print("error: this check needs OpenCV: pip install opencv-python-headless")
        return 2
    import jax
    import numpy as np
    from scipy.ndimage import gaussian_filter

    from jaxtrain.robustness.perturbations import corruption_params, perturb

    rows = []
    cases = [("cifar", 32, 3, "smooth"), ("cifar", 32, 3, "noise"), ("cifar", 32, 1, "noise"),
             ("imagenet", 224, 3, "smooth")]
    print(f"{'preset':>8} {'px':>4} {'C':>2} {'images':>7} {'sev':>4} {'max |diff|':>11} "
          f"{'mean |diff|':>12}")
    for preset, px, channels, kind in cases:
        x = np.random.default_rng(1).random((3, px, px, channels)).astype(np.float32)
        if kind == "smooth":
            x = np.stack([gaussian_filter(im, (3, 3, 0)) for im in x])
            x = ((x - x.min()) / (x.max() - x.min())).astype(np.float32)
        key = jax.random.key(7)
        for s in range(1, 6):
            c = corruption_params("elastic_transform", s, preset)
            jitter, u_dx, u_dy = draws(key, len(x), px, px, c[2])
            got = np.asarray(perturb(x, "elastic_transform", s, key, preset=preset))
            want = np.stack([reference(x[i], c, jitter[i], u_dx[i], u_dy[i])
                             for i in range(len(x))])
            d = np.abs(got - want)
            rows.append({"preset": preset, "px": px, "channels": channels, "images": kind,
                         "severity": s, "max_abs_diff": float(d.max()),
                         "mean_abs_diff": float(d.mean())})
            print(f"{preset:>8} {px:>4} {channels:>2} {kind:>7} {s:>4} {d.max():>11.2e} "
                  f"{d.mean():>12.2e}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "elastic_reference-cpu.json")
    with open(path, "w") as f:
        json.dump({"check": "elastic_transform vs make_cifar_c.py's code, same random draws",
                   "opencv": cv2.__version__, "jax": jax.__version__, "rows": rows}, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
