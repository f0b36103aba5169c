"""Tests for jaxtrain.robustness.attacks on tiny linear / MLP models.

XLA compiles dominate the runtime on CPU, so every attack goes through one
jitted runner with eps, alpha and key traced: each (attack, model, steps,
random_start) compiles once for the whole module. Keys are "rbg" keys because
threefry takes seconds to compile on XLA:CPU; the attacks accept any key.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtrain.robustness import attacks

N, H, W, C, K = 96, 4, 4, 3, 3  # tiny NHWC images, K classes
D = H * W * C


def _linear(params, images_NHWC):
    return images_NHWC.reshape(images_NHWC.shape[0], -1) @ params["w"] + params["b"][None, :]


def _mlp(params, images_NHWC):
    x_ND = images_NHWC.reshape(images_NHWC.shape[0], -1)
    h = jnp.tanh(x_ND @ params["w1"] + params["b1"][None, :])
    return h @ params["w2"] + params["b2"][None, :]


ARCHS = {"linear": _linear, "mlp": _mlp}


def rng_key(seed: int) -> jax.Array:
    return jax.random.key(seed, impl="rbg")


class Model(NamedTuple):
    arch: str
    params: dict[str, jax.Array]

    @property
    def logits_fn(self):
        return functools.partial(ARCHS[self.arch], self.params)


@functools.partial(jax.jit, static_argnames="arch")
def _logits(arch, params, images):
    return ARCHS[arch](params, images)


def ce(model: Model, images, labels) -> float:
    """Mean cross-entropy computed independently of the library, numpy float64."""
    z = np.asarray(_logits(model.arch, model.params, images), np.float64)
    z = z - z.max(1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-log_p[np.arange(len(labels)), np.asarray(labels)].mean())


def _attack_impl(name, arch, params, images, labels, eps, alpha, key, steps, random_start):
    logits_fn = functools.partial(ARCHS[arch], params)
    if name == "fgsm":
        return attacks.fgsm(logits_fn, images, labels, eps)
    attack = attacks.pgd_linf if name == "pgd_linf" else attacks.pgd_l2
    return attack(
        logits_fn, images, labels, eps, alpha=alpha, steps=steps, key=key, random_start=random_start
    )


_attack_jit = jax.jit(_attack_impl, static_argnames=("name", "arch", "steps", "random_start"))


def attack(name, model: Model, images, labels, eps, *, alpha=None, key=None, steps=10,
           random_start=True):
    """Jitted attack; alpha defaults to eps / 4; alpha=0 returns PGD's random start."""
    alpha = jnp.asarray(eps, jnp.float32) / 4 if alpha is None else alpha
    key = rng_key(3) if key is None else key
    return _attack_jit(name, model.arch, model.params, images, labels, jnp.float32(eps),
                       jnp.float32(alpha), key, steps, random_start)


ALL_ATTACKS = ["fgsm", "pgd_linf", "pgd_l2"]


def _l2_per_example(d) -> np.ndarray:
    d = np.asarray(d, np.float64)
    return np.sqrt((d**2).reshape(d.shape[0], -1).sum(1))


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data():
    """Separable 3-class images: a per-class prototype in [0.2, 0.8] plus small noise."""
    rng = np.random.default_rng(0)
    protos_KD = rng.uniform(0.2, 0.8, size=(K, D))
    labels = np.arange(N, dtype=np.int32) % K
    x = protos_KD[labels] + rng.normal(0.0, 0.05, size=(N, D))
    images = np.clip(x, 0.0, 1.0).reshape(N, H, W, C).astype(np.float32)
    return jnp.asarray(images), jnp.asarray(labels)


@functools.partial(jax.jit, static_argnames="arch")
def _train(arch, params, images, labels):
    """300 Adam steps on the mean cross-entropy: a 'trained-ish' model in well under a second."""
    opt = optax.adam(0.05)

    def loss_fn(p):
        logits = ARCHS[arch](p, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def step(carry, _):
        p, s = carry
        updates, s = opt.update(jax.grad(loss_fn)(p), s, p)
        return (optax.apply_updates(p, updates), s), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=300)
    return params


@pytest.fixture(scope="module")
def trained_linear(data):
    params = {"w": jnp.zeros((D, K)), "b": jnp.zeros((K,))}
    return Model("linear", _train("linear", params, *data))


@pytest.fixture(scope="module")
def trained_mlp(data):
    rng = np.random.default_rng(1)
    params = {
        "w1": jnp.asarray(rng.normal(size=(D, 16)) / np.sqrt(D), jnp.float32),
        "b1": jnp.zeros((16,)),
        "w2": jnp.asarray(rng.normal(size=(16, K)) / 4.0, jnp.float32),
        "b2": jnp.zeros((K,)),
    }
    return Model("mlp", _train("mlp", params, *data))


@pytest.fixture(scope="module")
def random_setup():
    """An untrained linear model on uniform images, so [0, 1] clipping is exercised."""
    rng = np.random.default_rng(2)
    params = {"w": rng.normal(size=(D, K)), "b": rng.normal(size=(K,))}
    model = Model("linear", {k: jnp.asarray(v, jnp.float32) for k, v in params.items()})
    images = jnp.asarray(rng.uniform(size=(N, H, W, C)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, K, size=(N,)), jnp.int32)
    return model, images, labels


# ---------------------------------------------------------------- threat model


@pytest.mark.parametrize("name", ALL_ATTACKS)
def test_stays_in_ball_and_in_range(name, random_setup):
    model, images, labels = random_setup
    eps = 0.5 if name == "pgd_l2" else 0.1
    adv = np.asarray(attack(name, model, images, labels, eps))
    delta = adv - np.asarray(images)
    assert adv.shape == images.shape and adv.dtype == np.float32
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    assert adv.min() == 0.0 and adv.max() == 1.0  # clipping was needed and applied
    if name == "pgd_l2":
        norms = _l2_per_example(delta)
        assert norms.max() <= eps + 1e-5
        assert np.median(norms) > 0.9 * eps  # the attack used its budget
    else:
        assert np.abs(delta).max() <= eps + 1e-6
        assert np.abs(delta).max() >= eps - 1e-6


@pytest.mark.parametrize("name", ALL_ATTACKS)
def test_attack_increases_loss(name, data, trained_linear):
    images, labels = data
    eps = 1.0 if name == "pgd_l2" else 0.1
    clean = ce(trained_linear, images, labels)
    adv = ce(trained_linear, attack(name, trained_linear, images, labels, eps), labels)
    assert adv > 10 * clean and adv > clean + 0.05, (clean, adv)


@pytest.mark.parametrize("model_name", ["trained_linear", "trained_mlp"])
def test_pgd_at_least_as_strong_as_fgsm(model_name, data, request):
    model = request.getfixturevalue(model_name)
    images, labels = data
    eps = 0.1
    loss_fgsm = ce(model, attack("fgsm", model, images, labels, eps), labels)
    loss_pgd = ce(model, attack("pgd_linf", model, images, labels, eps), labels)
    loss_start = ce(model, attack("pgd_linf", model, images, labels, eps, alpha=0.0), labels)
    assert loss_pgd >= loss_fgsm - 1e-5, (loss_pgd, loss_fgsm)
    assert loss_pgd > 2 * loss_start  # the iterations, not the random start, did the work


def test_huge_linf_budget_breaks_every_point(data, trained_linear):
    images, labels = data
    logits_fn = trained_linear.logits_fn
    # The identity "attack" gives clean accuracy: the model is worth breaking.
    assert float(attacks.robust_accuracy(logits_fn, images, labels, images)) >= 0.95
    for name in ("fgsm", "pgd_linf"):
        adv = attack(name, trained_linear, images, labels, 1.0)
        assert float(attacks.robust_accuracy(logits_fn, images, labels, adv)) == 0.0, name


# ---------------------------------------------------------------- exact update rule


def _numpy_linear_grad(w, b, x_NHWC, labels):
    """grad_x of the mean CE for logits = x @ w + b, in float64."""
    n = x_NHWC.shape[0]
    z = x_NHWC.reshape(n, -1) @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(n), labels] -= 1.0
    return ((p @ w.T) / n).reshape(x_NHWC.shape)


def test_attacks_match_numpy_reference(random_setup):
    model, images, labels = random_setup
    w, b = (np.asarray(model.params[k], np.float64) for k in ("w", "b"))
    x, y = np.asarray(images, np.float64), np.asarray(labels)
    eps_inf, alpha_inf, eps_2, alpha_2, steps = 0.1, 0.03, 0.7, 0.3, 10

    ref_inf, ref_2 = x.copy(), x.copy()
    for _ in range(steps):
        g = _numpy_linear_grad(w, b, ref_inf, y)
        d = np.clip(ref_inf + alpha_inf * np.sign(g) - x, -eps_inf, eps_inf)
        ref_inf = np.clip(x + d, 0, 1)
        g = _numpy_linear_grad(w, b, ref_2, y)
        d = ref_2 + alpha_2 * g / _l2_per_example(g).reshape(-1, 1, 1, 1) - x
        d_norm = _l2_per_example(d).reshape(-1, 1, 1, 1)
        ref_2 = np.clip(x + d * np.minimum(1.0, eps_2 / d_norm), 0, 1)
    ref_fgsm = np.clip(x + 0.2 * np.sign(_numpy_linear_grad(w, b, x, y)), 0, 1)

    kw = {"steps": steps, "random_start": False}
    out_inf = attack("pgd_linf", model, images, labels, eps_inf, alpha=alpha_inf, **kw)
    out_2 = attack("pgd_l2", model, images, labels, eps_2, alpha=alpha_2, **kw)
    np.testing.assert_allclose(out_inf, ref_inf, atol=1e-5)
    np.testing.assert_allclose(out_2, ref_2, atol=1e-5)
    np.testing.assert_allclose(attack("fgsm", model, images, labels, 0.2), ref_fgsm, atol=1e-6)


@pytest.mark.parametrize("name", ["pgd_linf", "pgd_l2"])
def test_random_start_is_in_ball_and_keyed(name, random_setup):
    model, images, labels = random_setup
    eps = 0.2
    start = functools.partial(attack, name, model, images, labels, eps, steps=0)
    a, a2, b = start(key=rng_key(0)), start(key=rng_key(0)), start(key=rng_key(1))
    delta = np.asarray(a) - np.asarray(images)
    if name == "pgd_linf":
        assert np.abs(delta).max() <= eps + 1e-6
        assert np.abs(delta).mean() > 0.2 * eps  # U(-eps, eps) has mean |.| eps / 2 before clipping
    else:
        norms = _l2_per_example(delta)
        assert norms.max() <= eps + 1e-5 and np.median(norms) > 0.5 * eps
    np.testing.assert_array_equal(a, a2)
    assert not np.array_equal(a, b)


# ---------------------------------------------------------------- transformations


@pytest.mark.parametrize("name", ALL_ATTACKS)
def test_vmap_over_eps_matches_separate_calls(name, random_setup):
    model, images, labels = random_setup
    eps_E = jnp.array([0.0, 0.03, 0.1, 0.4])

    @jax.jit
    def sweep(eps_E):
        return jax.vmap(lambda e: _attack_impl(
            name, "linear", model.params, images, labels, e, e / 4, rng_key(3), 10, True
        ))(eps_E)

    batched = sweep(eps_E)
    assert batched.shape == (4,) + images.shape
    for i, e in enumerate(eps_E):
        np.testing.assert_allclose(batched[i], attack(name, model, images, labels, e), atol=1e-6)
    np.testing.assert_array_equal(batched[0], images)  # eps = 0 leaves images unchanged


def test_jit_traces_once_for_all_eps(random_setup):
    model, images, labels = random_setup
    traces = []

    @jax.jit
    def run(x, y, eps, key):
        traces.append(None)
        return attacks.pgd_linf(model.logits_fn, x, y, eps, alpha=eps / 4, steps=10, key=key)

    for eps in (0.01, 0.05, 0.2):
        np.testing.assert_allclose(
            run(images, labels, eps, rng_key(3)),
            attack("pgd_linf", model, images, labels, eps),
            atol=1e-6,
        )
    assert len(traces) == 1


def test_no_gradient_flows_through_the_attack(random_setup):
    model, images, labels = random_setup

    def total(x):
        return jnp.sum(attacks.fgsm(model.logits_fn, x, labels, 0.1))

    np.testing.assert_array_equal(jax.jit(jax.grad(total))(images), np.zeros(images.shape))


# ---------------------------------------------------------------- evaluation and presets


def test_robust_accuracy_counts_clean_errors_as_broken():
    def logits_fn(x):  # logits are the two pixels
        return x.reshape(x.shape[0], 2)

    clean = jnp.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]]).reshape(4, 1, 1, 2)
    adv = jnp.array([[0.9, 0.1], [0.1, 0.9], [0.1, 0.9], [0.9, 0.1]]).reshape(4, 1, 1, 2)
    labels = jnp.array([0, 0, 0, 0])
    # 0: robust; 1: broken by the attack; 2: wrong clean and adv; 3: wrong clean, right adv.
    np.testing.assert_array_equal(
        attacks.robust_correct(logits_fn, clean, labels, adv), [True, False, False, False]
    )
    assert float(attacks.robust_accuracy(logits_fn, clean, labels, adv)) == 0.25
    mask = jnp.array([1, 1, 0, 0])
    assert float(attacks.robust_accuracy(logits_fn, clean, labels, adv, mask=mask)) == 0.5


def test_presets():
    d = attacks.ATTACK_DEFAULTS
    assert d["mnist"]["linf"] == attacks.AttackSpec("pgd_linf", eps=0.3, alpha=0.01, steps=40)
    cifar_linf = attacks.AttackSpec("pgd_linf", eps=8 / 255, alpha=2 / 255, steps=10)
    assert d["cifar"]["linf"] == cifar_linf
    assert d["cifar"]["l2"].method == "pgd_l2" and d["cifar"]["l2"].eps == 0.5
    with pytest.raises(TypeError):
        d["cifar"]["linf"] = d["mnist"]["linf"]  # presets are read-only


def test_run_attack_dispatches(random_setup):
    """run_attack builds exactly the program of the attack its spec names (traced, not run)."""
    model, images, labels = random_setup
    f, k = model.logits_fn, rng_key(3)
    spec = attacks.ATTACK_DEFAULTS["cifar"]["l2"]

    def program(fn):
        return str(jax.make_jaxpr(fn)(images))

    assert program(lambda x: attacks.run_attack(f, x, labels, spec, key=k)) == program(
        lambda x: attacks.pgd_l2(f, x, labels, spec.eps, alpha=spec.alpha, steps=spec.steps, key=k)
    )
    linf = dataclasses.replace(spec, method="pgd_linf", random_start=False)
    assert program(lambda x: attacks.run_attack(f, x, labels, linf)) == program(
        lambda x: attacks.pgd_linf(f, x, labels, spec.eps, alpha=spec.alpha, steps=spec.steps,
                                   random_start=False)
    )
    fgsm = attacks.AttackSpec("fgsm", 0.1)
    assert program(lambda x: attacks.run_attack(f, x, labels, fgsm)) == program(
        lambda x: attacks.fgsm(f, x, labels, 0.1)
    )
    assert program(lambda x: attacks.run_attack(f, x, labels, fgsm)) != program(
        lambda x: attacks.fgsm(f, x, labels, 0.2)
    )


def test_bad_arguments_fail_loudly(random_setup):
    model, images, labels = random_setup
    f = model.logits_fn
    with pytest.raises(ValueError, match="key"):
        attacks.pgd_linf(f, images, labels, 0.1, alpha=0.01, steps=1)
    with pytest.raises(ValueError, match="scalar"):
        attacks.fgsm(f, images, labels, jnp.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="labels"):
        attacks.fgsm(f, images, labels[:3], 0.1)
    with pytest.raises(TypeError):
        attacks.pgd_l2(f, images, labels, 0.1, alpha=0.01, steps=2.5, random_start=False)
    with pytest.raises(ValueError, match="unknown attack"):
        bad = attacks.AttackSpec("cw", 0.1)  # type: ignore[arg-type]
        attacks.run_attack(f, images, labels, bad)
