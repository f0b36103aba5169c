"""``jaxtrain.pooling``: the elementwise max-pool gradient is ``nn.max_pool``'s, exactly."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain import models, pooling
from jaxtrain.models import create_model


def _pool_ref(x):
    return nn.max_pool(x, (2, 2), strides=(2, 2))


def _value_and_vjp(pool, x, g):
    y, vjp = jax.vjp(pool, x)
    return y, vjp(g)[0]


@pytest.mark.parametrize("shape", [(4, 8, 8, 3), (2, 7, 9, 5), (3, 28, 28, 32)])
@pytest.mark.parametrize("data", ["normal", "relu", "ties"])
def test_max_pool_2x2_matches_nn_max_pool_values_and_gradient(shape, data):
    kx, kg = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, shape)
    if data == "relu":  # whole windows of zeros, as after a ReLU
        x = jax.nn.relu(x)
    elif data == "ties":  # many equal maxima inside a window
        x = jnp.round(x)
    g = jax.random.normal(kg, (shape[0], shape[1] // 2, shape[2] // 2, shape[3]))
    y_ref, dx_ref = jax.jit(functools.partial(_value_and_vjp, _pool_ref))(x, g)
    y, dx = jax.jit(functools.partial(_value_and_vjp, pooling.max_pool_2x2))(x, g)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)  # the same element of each window, ties included


@pytest.mark.parametrize("shape", [(4, 8, 8, 3), (2, 7, 9, 5), (3, 28, 28, 32)])
@pytest.mark.parametrize("data", ["normal", "ties", "nonpositive"])
def test_relu_max_pool_2x2_matches_relu_then_nn_max_pool(shape, data):
    kx, kg = jax.random.split(jax.random.key(3))
    x = jax.random.normal(kx, shape)
    if data == "ties":  # equal maxima, zeros and exact negatives inside windows
        x = jnp.round(x)
    elif data == "nonpositive":  # windows whose maximum is 0 or negative: no gradient
        x = -jnp.abs(jnp.round(x))
    g = jax.random.normal(kg, (shape[0], shape[1] // 2, shape[2] // 2, shape[3]))
    ref = functools.partial(_value_and_vjp, lambda v: _pool_ref(jax.nn.relu(v)))
    y_ref, dx_ref = jax.jit(ref)(x, g)
    y, dx = jax.jit(functools.partial(_value_and_vjp, pooling.relu_max_pool_2x2))(x, g)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)
    assert dx.dtype == x.dtype and dx.shape == x.shape


def test_relu_max_pool_2x2_bfloat16_and_residual_size():
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 4)).astype(jnp.bfloat16)
    g = jnp.ones((2, 3, 3, 4), jnp.bfloat16)
    y_ref, dx_ref = _value_and_vjp(lambda v: _pool_ref(jax.nn.relu(v)), x, g)
    y, dx = _value_and_vjp(pooling.relu_max_pool_2x2, x, g)
    assert dx.dtype == jnp.bfloat16
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)
    # what the backward keeps: one uint8 per output, not the input
    _, vjp = jax.vjp(pooling.relu_max_pool_2x2, x)
    leaves = [a for a in jax.tree.leaves(vjp) if hasattr(a, "dtype")]
    assert [(a.shape, a.dtype) for a in leaves] == [((2, 3, 3, 4), jnp.uint8)]


def test_max_pool_2x2_bfloat16():
    x = jax.nn.relu(jax.random.normal(jax.random.key(1), (2, 6, 6, 4))).astype(jnp.bfloat16)
    g = jnp.ones((2, 3, 3, 4), jnp.bfloat16)
    y_ref, dx_ref = _value_and_vjp(_pool_ref, x, g)
    y, dx = _value_and_vjp(pooling.max_pool_2x2, x, g)
    assert dx.dtype == jnp.bfloat16
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)


@pytest.mark.parametrize("shape", [(8, 28, 28, 1), (4, 12, 12, 3)])
def test_cnn_pools_agree_params_outputs_and_gradients(shape):
    """``CNN`` (elementwise pool gradient) against ``CNN(pool="xla")`` (``nn.max_pool``)."""
    x = jax.random.uniform(jax.random.key(0), shape)
    y = jax.random.randint(jax.random.key(2), (shape[0],), 0, 10)
    fast = create_model("cnn", 10, mean=(0.5,), std=(0.25,))
    ref = models.CNN(10, mean=(0.5,), std=(0.25,), pool="xla")
    assert fast.pool == "elementwise"
    variables = jax.jit(ref.init)(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
        jnp.shape, jax.eval_shape(fast.init, jax.random.key(1), x))

    def loss(model, v):
        logits = model.apply(v, x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    @jax.jit
    def outputs_and_grads(v):
        return (ref.apply(v, x), fast.apply(v, x), jax.grad(functools.partial(loss, ref))(v),
                jax.grad(functools.partial(loss, fast))(v))

    y_ref, y_fast, g_ref, g_fast = outputs_and_grads(variables)
    np.testing.assert_allclose(y_fast, y_ref, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6),
                 g_ref, g_fast)


def test_benchmark_registers_the_select_and_scatter_cnn_with_the_same_first_loss():
    from benchmarks import torch_peer

    torch_peer.register_benchmark_models()
    assert models.MODELS["cnn_xlapool"](10).pool == "xla"
    assert {"select_and_scatter maxpool"} <= set(torch_peer.CNN_VARIANTS)
    case = {"data": "mnist", "batch_size": 16, "steps": 2, "repeats": 1, "seconds": 0.1,
            "synthetic_size": 256}
    ref = torch_peer.jax_steps({**case, "model": "cnn_xlapool"})
    fast = torch_peer.jax_steps({**case, "model": "cnn"})
    assert fast["first_loss"] == pytest.approx(ref["first_loss"], rel=1e-5)
    assert fast["steps_per_s"] > 0
