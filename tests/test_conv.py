"""``jaxtrain.conv``: XLA's convolution forward, its weight gradient as matmuls."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtrain import compile_options, conv, models
from jaxtrain.compile_options import compiler_options
from jaxtrain.state import create_train_state
from jaxtrain.steps import train_step

FAST = {"xla_backend_optimization_level": 0}  # LLVM unoptimized: compiles faster, same math


def _ref(x, k):
    """``nn.Conv``'s own computation (stride 1, 'SAME', no bias)."""
    return nn.Conv(k.shape[-1], k.shape[:2], use_bias=False).apply({"params": {"kernel": k}}, x)


def _normal(seed: int, shape) -> np.ndarray:
    """Host inputs: numpy, so that making them compiles nothing (each eager jax op does)."""
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _value_and_grads(fn, x, k, g):
    y, vjp = jax.vjp(fn, x, k)
    return (y, *vjp(g))


# (2, 2) is even (padding 0 before, 1 after); C * kh * kw <= 32 takes the one-dot path.
@pytest.mark.parametrize("shape, kernel", [((4, 12, 12, 1), (3, 3)), ((2, 9, 7, 3), (3, 3)),
                                           ((2, 6, 6, 32), (3, 3)), ((3, 8, 8, 4), (2, 2)),
                                           ((2, 7, 7, 1), (5, 5))])
def test_conv_same_is_nn_conv_values_and_gradients(shape, kernel):
    x, k, g = _normal(0, shape), _normal(1, (*kernel, shape[-1], 16)), _normal(2, (*shape[:3], 16))
    y_ref, dx_ref, dk_ref = jax.jit(functools.partial(_value_and_grads, _ref))(x, k, g)
    y, dx, dk = jax.jit(functools.partial(_value_and_grads, conv.conv_same))(x, k, g)
    np.testing.assert_array_equal(y, y_ref)  # the forward is XLA's convolution itself
    np.testing.assert_array_equal(dx, dx_ref)  # so is the input gradient
    np.testing.assert_allclose(dk, dk_ref, rtol=1e-4, atol=1e-4 * float(jnp.abs(dk_ref).max()))


@pytest.mark.parametrize("shape, kernel", [((4, 12, 12, 1), (3, 3)), ((2, 9, 7, 3), (3, 3)),
                                           ((3, 8, 8, 4), (2, 2)), ((2, 7, 7, 1), (5, 5))])
def test_conv_same_taps_forward_is_the_same_convolution(shape, kernel):
    """``taps=True``: XLA's convolution to float rounding, and the same backward."""
    x, k, g = _normal(0, shape), _normal(1, (*kernel, shape[-1], 16)), _normal(2, (*shape[:3], 16))
    y_ref, dx_ref, dk_ref = jax.jit(functools.partial(_value_and_grads, conv.conv_same))(x, k, g)
    taps = functools.partial(conv.conv_same, taps=True)
    y, dx, dk = jax.jit(functools.partial(_value_and_grads, taps))(x, k, g)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(y_ref).max()))
    np.testing.assert_array_equal(dx, dx_ref)
    np.testing.assert_array_equal(dk, dk_ref)
    yb = conv.conv_same(x.astype(jnp.bfloat16), k.astype(jnp.bfloat16), True)
    assert yb.dtype == jnp.bfloat16
    np.testing.assert_allclose(yb.astype(jnp.float32), y_ref, rtol=0.05,
                               atol=0.05 * float(jnp.abs(y_ref).max()))


def test_conv_same_under_vmap_and_bfloat16():
    """Seed runs vmap the step; bf16 runs compute in bf16 (the kernel gradient keeps its dtype)."""
    x, k = _normal(0, (2, 2, 5, 5, 2)), _normal(1, (2, 3, 3, 2, 4))  # [S, B, H, W, C], [S, HWIO]
    loss = lambda f: (lambda x, k: jnp.sum(jax.vmap(f)(x, k) ** 2))

    @jax.jit
    def grads(x, k):
        bf16 = lambda k: jnp.sum(conv.conv_same(x[0].astype(jnp.bfloat16), k).astype(jnp.float32))
        return (jax.grad(loss(_ref), argnums=1)(x, k),
                jax.grad(loss(conv.conv_same), argnums=1)(x, k),
                jax.grad(bf16)(k[0].astype(jnp.bfloat16)))

    want, got, dk = grads(x, k)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    assert dk.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(dk.astype(jnp.float32))))


def test_matmul_grad_conv_has_nn_conv_params_and_outputs():
    x = _normal(0, (2, 6, 6, 3))
    ref, ours = nn.Conv(8, (3, 3)), conv.MatmulGradConv(8, (3, 3))

    @jax.jit
    def both(key):
        v_ref, v_ours = ref.init(key, x), ours.init(key, x)
        v = jax.tree.map(lambda a: a + 0.1, v_ref)  # a non-zero bias
        return v_ref, v_ours, ref.apply(v, x), ours.apply(v, x)

    v_ref, v_ours, y_ref, y = both(jax.random.key(1))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), v_ref, v_ours))
    np.testing.assert_array_equal(y, y_ref)


def _custom_vjps(model, x) -> int:
    jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x))(jax.eval_shape(model.init,
                                                                        jax.random.key(0), x))
    return str(jaxpr).count("custom_vjp_call")


def test_cnn_conv_auto_picks_a_lowering_per_layer_and_checks_names(monkeypatch):
    x = jnp.zeros((2, 12, 12, 1))
    cnn = models.create_model("cnn", 10).clone(pool="xla")  # conv "auto"; pool without custom_vjp
    assert jax.default_backend() == "cpu" and jax.local_device_count() == 8  # conftest's devices
    # the narrow first layer (C = 1) is conv_same(taps=True) on CPU; the second XLA's
    assert _custom_vjps(cnn, x) == 1
    assert _custom_vjps(cnn.clone(conv="matmul_grad"), x) == 2
    assert _custom_vjps(cnn.clone(conv="taps"), x) == 1
    assert _custom_vjps(cnn.clone(conv="xla"), x) == 0
    monkeypatch.setattr(jax, "local_device_count", lambda: 1)
    # one CPU device: XLA's convolution when jaxtrain's programs take Eigen's
    # (compile_options), its weight gradient as matmuls when they keep YNNPACK's
    assert _custom_vjps(cnn, x) == (1 if compiler_options("cpu") is not None else 2)
    monkeypatch.setenv(compile_options.ENV, "xla")
    assert _custom_vjps(cnn, x) == 2
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert _custom_vjps(cnn, x) == 0  # cuDNN's convolutions throughout
    with pytest.raises(ValueError, match="unknown conv 'fast'"):
        models.CNN(10, conv="fast").init(jax.random.key(0), x)


def test_cnn_training_steps_match_between_conv_lowerings():
    """Four Adam steps: the matmul weight gradient trains like XLA's (same params, batches)."""
    x = np.abs(_normal(0, (8, 12, 12, 1)))
    y = np.arange(8, dtype=np.int32)
    losses, key = {}, jax.random.key(3)  # no dropout: the key goes unused
    for kind in ("xla", "matmul_grad", "taps"):
        model = models.CNN(10, features=(8, 16), dense=32, conv=kind)
        init = functools.partial(create_train_state, model, optax.adam(1e-3))
        state = jax.jit(init, compiler_options=FAST)(jax.random.key(2), x[:1])
        step = jax.jit(train_step, compiler_options=FAST)
        out = []
        for _ in range(4):
            state, m = step(state, {"image": x, "label": y}, key)
            out.append(float(m["loss"]))
        losses[kind] = out
    np.testing.assert_allclose(losses["matmul_grad"], losses["xla"], rtol=1e-4)
    np.testing.assert_allclose(losses["taps"], losses["xla"], rtol=1e-4)
    assert losses["xla"][-1] < losses["xla"][0]
