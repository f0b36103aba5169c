"""Schedules at key steps, optimizers on a quadratic, clipping, weight decay, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtrain.optim import OPTIMIZERS, SCHEDULES, create_optimizer, create_schedule


def values(schedule, steps):
    return np.array([float(schedule(s)) for s in steps])


# ----------------------------------------------------------------------------- schedules


def test_constant_schedule_with_and_without_warmup():
    np.testing.assert_allclose(values(create_schedule("constant", 0.5, 100), [0, 1, 50, 99]), 0.5)
    s = create_schedule("constant", 0.5, 100, warmup_steps=10)
    np.testing.assert_allclose(values(s, [0, 5, 10, 11, 99]), [0.0, 0.25, 0.5, 0.5, 0.5], atol=1e-7)


def test_cosine_schedule_warms_up_then_decays_to_zero():
    s = create_schedule("cosine", 1.0, 110, warmup_steps=10)
    np.testing.assert_allclose(
        values(s, [0, 5, 10, 60, 110]), [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6
    )
    # Half-cosine: a quarter of the way through the decay, (1 + cos(pi/4)) / 2.
    np.testing.assert_allclose(float(s(35)), (1 + np.cos(np.pi / 4)) / 2, rtol=1e-5)
    v = values(s, range(10, 111))
    assert np.all(np.diff(v) <= 1e-7)
    np.testing.assert_allclose(values(create_schedule("cosine", 2.0, 100), [0, 50, 100]),
                               [2.0, 1.0, 0.0], atol=1e-6)


def test_step_schedule_drops_at_fractions_of_the_run():
    s = create_schedule("step", 1.0, 100)
    np.testing.assert_allclose(values(s, [0, 49, 50, 74, 75, 99]),
                               [1, 1, 0.1, 0.1, 0.01, 0.01], rtol=1e-6)
    w = create_schedule("step", 1.0, 100, warmup_steps=10)  # drops stay at the same global steps
    np.testing.assert_allclose(values(w, [0, 5, 10, 49, 50, 75]),
                               [0, 0.5, 1, 1, 0.1, 0.01], rtol=1e-6, atol=1e-7)
    c = create_schedule("step", 1.0, 100, step_boundaries=(0.3,), step_factor=0.5)
    np.testing.assert_allclose(values(c, [29, 30, 99]), [1, 0.5, 0.5])


def test_step_boundaries_on_the_same_step_compound():
    s = create_schedule("step", 1.0, 2)  # 0.5 * 2 and 0.75 * 2 both round to step 1
    np.testing.assert_allclose(values(s, [0, 1]), [1.0, 0.01], rtol=1e-6)


def test_warmup_longer_than_the_run_is_clamped():
    s = create_schedule("cosine", 1.0, 5, warmup_steps=100)
    assert float(s(4)) == pytest.approx(1.0)


def test_unknown_names_raise_value_errors_listing_choices():
    with pytest.raises(ValueError, match="unknown schedule 'linear'.*cosine"):
        create_schedule("linear", 0.1, 10)
    with pytest.raises(ValueError, match="unknown optimizer 'lion'.*adamw"):
        create_optimizer("lion", optax.constant_schedule(0.1))
    assert set(SCHEDULES) == {"constant", "cosine", "step"}


# ----------------------------------------------------------------------------- optimizers

A = jnp.array([1.0, 4.0, 0.5, 2.0])
TARGET = jnp.array([1.0, -2.0, 3.0, 0.5])


def quadratic(w):
    return 0.5 * jnp.sum(A * (w - TARGET) ** 2)


def minimize(tx, w, steps):
    @jax.jit
    def run(w):
        def body(carry, _):
            w, opt = carry
            updates, opt = tx.update(jax.grad(quadratic)(w), opt, w)
            return (optax.apply_updates(w, updates), opt), None

        (w, _), _ = jax.lax.scan(body, (w, tx.init(w)), None, length=steps)
        return w

    return run(w)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_minimizes_a_quadratic(name):
    lr = {"sgd": 0.2, "momentum": 0.05, "adam": 0.1, "adamw": 0.1}[name]
    tx = create_optimizer(name, optax.constant_schedule(lr))
    w0 = jnp.zeros(4)
    w = minimize(tx, w0, 300)
    assert float(quadratic(w)) < 1e-3 * float(quadratic(w0))
    np.testing.assert_allclose(w, TARGET, atol=0.05)


def test_momentum_and_nesterov_differ_from_plain_sgd():
    sched = optax.constant_schedule(0.05)
    w = jnp.zeros(4)
    sgd = minimize(create_optimizer("sgd", sched), w, 3)
    mom = minimize(create_optimizer("momentum", sched, momentum=0.9), w, 3)
    nes = minimize(create_optimizer("momentum", sched, momentum=0.9, nesterov=True), w, 3)
    assert not np.allclose(sgd, mom) and not np.allclose(mom, nes)


def test_global_norm_clipping_bounds_the_update():
    tx = create_optimizer("sgd", optax.constant_schedule(1.0), clip_norm=0.5)
    params = {"a": np.ones(3, np.float32), "b": np.ones((2, 2), np.float32)}
    big = {"a": np.full(3, 100.0, np.float32), "b": np.full((2, 2), -50.0, np.float32)}
    updates, _ = jax.jit(tx.update)(big, tx.init(params), params)
    assert float(optax.tree.norm(updates)) == pytest.approx(0.5, rel=1e-5)
    # Direction is kept: the update is the gradient scaled down.
    scale = float(updates["a"][0]) / -100.0
    np.testing.assert_allclose(updates["b"], -scale * big["b"], rtol=1e-5)
    small = jax.tree.map(lambda g: g * 1e-3, big)
    updates, _ = jax.jit(tx.update)(small, tx.init(params), params)
    np.testing.assert_allclose(updates["a"], -small["a"], rtol=1e-6)  # under the bound: unchanged
    unclipped = create_optimizer("sgd", optax.constant_schedule(1.0))
    updates, _ = jax.jit(unclipped.update)(big, unclipped.init(params), params)
    assert float(optax.tree.norm(updates)) > 100


def test_weight_decay_l2_for_sgd_decoupled_for_adamw():
    params = jnp.array([2.0, -4.0])
    zero = jnp.zeros(2)
    lr, wd = 0.1, 0.01
    for name in ("sgd", "momentum", "adamw"):
        tx = create_optimizer(name, optax.constant_schedule(lr), weight_decay=wd)
        updates, _ = tx.update(zero, tx.init(params), params)
        # With a zero gradient only the decay acts: -lr * wd * params on the first step.
        np.testing.assert_allclose(updates, -lr * wd * params, rtol=1e-5, err_msg=name)
    # Adam adds the decay to the gradient (L2), so Adam's normalization rescales it to ~lr.
    tx = create_optimizer("adam", optax.constant_schedule(lr), weight_decay=wd)
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates, -lr * np.sign(params), rtol=1e-3)
    # No decay: a zero gradient leaves the params where they are.
    for name in OPTIMIZERS:
        tx = create_optimizer(name, optax.constant_schedule(lr))
        updates, _ = tx.update(zero, tx.init(params), params)
        np.testing.assert_array_equal(updates, 0.0, err_msg=name)


def test_optimizer_follows_the_schedule():
    sched = create_schedule("step", 1.0, 4, step_boundaries=(0.5,), step_factor=0.1)
    tx = create_optimizer("sgd", sched)
    params, grad = jnp.zeros(1), jnp.ones(1)
    state = tx.init(params)
    seen = []
    for _ in range(4):
        updates, state = tx.update(grad, state, params)
        seen.append(-float(updates[0]))
    np.testing.assert_allclose(seen, [1.0, 1.0, 0.1, 0.1], rtol=1e-6)
