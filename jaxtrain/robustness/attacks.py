"""White-box adversarial attacks: FGSM, PGD-Linf, PGD-L2 (see docs ROBUSTNESS.md).

A model is any `logits_fn(images_NHWC) -> logits_NK`, usually a closure over
params; images are float in [0, 1]. Every attack maximises the mean softmax
cross-entropy of the *true* label, is a pure function of its inputs and a key,
and can be jitted. `eps` and `alpha` may be traced scalars, so one compiled
attack sweeps a whole array of budgets:

    advs_ENHWC = jax.vmap(
        lambda e: pgd_linf(f, x, y, e, alpha=e / 4, steps=10, key=k))(eps_E)

Attacks return `lax.stop_gradient` of the adversarial images: adversarial
training differentiates the loss at x_adv w.r.t. the params, not through the
attack's inner loop (Danskin's theorem, as in Madry et al. 2018).
"""
from __future__ import annotations

import dataclasses
import math
import operator
import types
from collections.abc import Callable, Mapping
from typing import Literal

import jax
import jax.numpy as jnp
import optax
from jax import lax

LogitsFn = Callable[[jax.Array], jax.Array]
AttackMethod = Literal["fgsm", "pgd_linf", "pgd_l2"]


# ---------------------------------------------------------------- helpers


def _clip01(x: jax.Array) -> jax.Array:
    return jnp.clip(x, 0.0, 1.0)


def _as_scalar(value: jax.typing.ArrayLike, dtype: jnp.dtype, name: str) -> jax.Array:
    value = jnp.asarray(value, dtype)
    if value.ndim != 0:
        raise ValueError(
            f"{name} must be a scalar, got shape {value.shape}; "
            f"to sweep several values use jax.vmap over the attack"
        )
    return value


def _check_inputs(images: jax.Array, labels: jax.Array) -> None:
    if images.ndim < 2 or labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"expected images [N, ...] and labels [N]; got {images.shape} and {labels.shape}"
        )


def _require_key(key: jax.Array | None, attack: str) -> jax.Array:
    if key is None:
        raise ValueError(f"{attack} with random_start=True needs key=; or pass random_start=False")
    return key


def _per_example_l2(x_NX: jax.Array) -> jax.Array:
    """L2 norm over every axis but the first: [N, ...] -> [N, 1, ..., 1]."""
    return jnp.sqrt(jnp.sum(jnp.square(x_NX), axis=tuple(range(1, x_NX.ndim)), keepdims=True))


def _safe_divisor(norm: jax.Array) -> jax.Array:
    return jnp.maximum(norm, jnp.finfo(norm.dtype).tiny)


def _project_l2(delta_NX: jax.Array, eps: jax.Array) -> jax.Array:
    """delta * min(1, eps / ||delta||_2), per example."""
    return delta_NX * jnp.minimum(1.0, eps / _safe_divisor(_per_example_l2(delta_NX)))


def _steps(steps: int) -> int:
    steps = operator.index(steps)  # a traced or float step count fails here, loudly
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    return steps


def attack_loss(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of the true labels; images [N, ...], labels int [N] -> []."""
    logits_NK = logits_fn(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits_NK, labels).mean()


def _input_grad(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array) -> jax.Array:
    return jax.grad(lambda x: attack_loss(logits_fn, x, labels))(images)


# ---------------------------------------------------------------- attacks


def fgsm(
    logits_fn: LogitsFn,
    images: jax.Array,
    labels: jax.Array,
    eps: jax.typing.ArrayLike,
) -> jax.Array:
    """Fast gradient sign method: clip01(x + eps * sign(grad_x CE)).

    images float [N, H, W, C] in [0, 1]; labels int [N]; eps scalar (may be
    traced). Returns adversarial images, same shape and dtype.
    """
    _check_inputs(images, labels)
    eps = _as_scalar(eps, images.dtype, "eps")
    g = _input_grad(logits_fn, images, labels)
    return lax.stop_gradient(_clip01(images + eps * jnp.sign(g)))


def pgd_linf(
    logits_fn: LogitsFn,
    images: jax.Array,
    labels: jax.Array,
    eps: jax.typing.ArrayLike,
    *,
    alpha: jax.typing.ArrayLike,
    steps: int,
    key: jax.Array | None = None,
    random_start: bool = True,
) -> jax.Array:
    """Projected gradient descent in the Linf ball (Madry et al. 2018).

    x_0 = clip01(x + U(-eps, eps)) (or x without random start); then `steps`
    times x_{t+1} = clip01(x + clip(x_t + alpha * sign(g_t) - x, -eps, eps)).
    images float [N, H, W, C] in [0, 1]; labels int [N]; eps, alpha scalars
    (may be traced); steps a Python int. Returns images of the same shape.
    """
    _check_inputs(images, labels)
    eps = _as_scalar(eps, images.dtype, "eps")
    alpha = _as_scalar(alpha, images.dtype, "alpha")
    steps = _steps(steps)
    if random_start:
        noise = jax.random.uniform(
            _require_key(key, "pgd_linf"), images.shape, images.dtype, minval=-eps, maxval=eps
        )
        x0 = _clip01(images + noise)
    else:
        x0 = images

    def step(_: int, x_t: jax.Array) -> jax.Array:
        g = _input_grad(logits_fn, x_t, labels)
        delta = jnp.clip(x_t + alpha * jnp.sign(g) - images, -eps, eps)
        return _clip01(images + delta)

    return lax.stop_gradient(lax.fori_loop(0, steps, step, x0))


def pgd_l2(
    logits_fn: LogitsFn,
    images: jax.Array,
    labels: jax.Array,
    eps: jax.typing.ArrayLike,
    *,
    alpha: jax.typing.ArrayLike,
    steps: int,
    key: jax.Array | None = None,
    random_start: bool = True,
) -> jax.Array:
    """Projected gradient descent in the per-example L2 ball.

    Random start: a point drawn uniformly from the L2 ball of radius eps
    (direction ~ normalised Gaussian, radius eps * U^(1/d)), then clip01.
    Step: x_t + alpha * g / ||g||_2; projection: delta * min(1, eps/||delta||_2);
    then clip01 (which can only shrink |delta|, so the ball is kept).
    images float [N, H, W, C] in [0, 1]; labels int [N]; eps, alpha scalars
    (may be traced); steps a Python int. Returns images of the same shape.
    """
    _check_inputs(images, labels)
    eps = _as_scalar(eps, images.dtype, "eps")
    alpha = _as_scalar(alpha, images.dtype, "alpha")
    steps = _steps(steps)
    if random_start:
        key_dir, key_radius = jax.random.split(_require_key(key, "pgd_l2"))
        direction = jax.random.normal(key_dir, images.shape, images.dtype)
        direction = direction / _safe_divisor(_per_example_l2(direction))
        dim = math.prod(images.shape[1:])
        u = jax.random.uniform(key_radius, (images.shape[0],) + (1,) * (images.ndim - 1))
        radius = eps * (u ** (1.0 / dim)).astype(images.dtype)
        x0 = _clip01(images + radius * direction)
    else:
        x0 = images

    def step(_: int, x_t: jax.Array) -> jax.Array:
        g = _input_grad(logits_fn, x_t, labels)
        g_unit = g / _safe_divisor(_per_example_l2(g))
        delta = _project_l2(x_t + alpha * g_unit - images, eps)
        return _clip01(images + delta)

    return lax.stop_gradient(lax.fori_loop(0, steps, step, x0))


# ---------------------------------------------------------------- evaluation


def robust_correct(
    logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, adv_images: jax.Array
) -> jax.Array:
    """bool [N]: correct on the clean image *and* on its adversarial version.

    A point already wrong on clean input counts as broken, whatever the attack
    found. Sum it over chunks for exact robust accuracy on large test sets.
    """
    clean_ok = jnp.argmax(logits_fn(images), axis=-1) == labels
    adv_ok = jnp.argmax(logits_fn(adv_images), axis=-1) == labels
    return clean_ok & adv_ok


def robust_accuracy(
    logits_fn: LogitsFn,
    images: jax.Array,
    labels: jax.Array,
    adv_images: jax.Array,
    *,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Fraction of examples robustly correct (see `robust_correct`); scalar float32.

    mask: optional [N] bool or 0/1; nonzero entries count once, others not at all
    (padding of the last eval batch).
    """
    ok_N = robust_correct(logits_fn, images, labels, adv_images)
    if mask is None:
        return jnp.mean(ok_N.astype(jnp.float32))
    valid_N = jnp.asarray(mask).astype(bool)
    return jnp.sum(ok_N & valid_N) / jnp.sum(valid_N).astype(jnp.float32)


# ---------------------------------------------------------------- presets


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """One attack and its budget; `dataclasses.replace(spec, eps=...)` for sweeps."""

    method: AttackMethod
    eps: float
    alpha: float = 0.0  # unused by fgsm
    steps: int = 0  # unused by fgsm
    random_start: bool = True


# Linf budgets are the common defaults (Madry et al. 2018; RobustBench). The
# L2 step size follows Madry's 2.5 * eps / steps rule, which also gives the
# CIFAR Linf alpha of 2/255.
ATTACK_DEFAULTS: Mapping[str, Mapping[str, AttackSpec]] = types.MappingProxyType(
    {
        "mnist": types.MappingProxyType(
            {"linf": AttackSpec("pgd_linf", eps=0.3, alpha=0.01, steps=40)}
        ),
        "cifar": types.MappingProxyType(
            {
                "linf": AttackSpec("pgd_linf", eps=8 / 255, alpha=2 / 255, steps=10),
                "l2": AttackSpec("pgd_l2", eps=0.5, alpha=0.125, steps=10),
            }
        ),
    }
)


def run_attack(
    logits_fn: LogitsFn,
    images: jax.Array,
    labels: jax.Array,
    spec: AttackSpec,
    *,
    key: jax.Array | None = None,
) -> jax.Array:
    """Run the attack `spec` names; images [N, H, W, C] -> adversarial images, same shape."""
    if spec.method == "fgsm":
        return fgsm(logits_fn, images, labels, spec.eps)
    if spec.method in ("pgd_linf", "pgd_l2"):
        attack = pgd_linf if spec.method == "pgd_linf" else pgd_l2
        return attack(
            logits_fn,
            images,
            labels,
            spec.eps,
            alpha=spec.alpha,
            steps=spec.steps,
            key=key,
            random_start=spec.random_start,
        )
    raise ValueError(f"unknown attack method {spec.method!r}; expected fgsm, pgd_linf or pgd_l2")
