"""``compile_options``: jaxtrain's CPU programs take Eigen's convolutions, nothing else changes.

The option names one jaxlib's set of YNNPACK fusion types, so the tests pin what
the module docstring claims on the installed jaxlib: convolutions leave YNNPACK,
adding ``INDIVIDUAL_CONVOLUTION`` back gives XLA's default program exactly (so
nothing else moved), a program without convolutions compiles as before, and a
training step computes the same loss and gradients either way.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from jaxtrain import compile_options, models
from jaxtrain.compile_options import CPU_CONV_EIGEN, compiler_options
from jaxtrain.parallel import create_strategy
from jaxtrain.state import create_train_state
from jaxtrain.steps import train_step

KEY = "xla_cpu_experimental_ynn_fusion_type"
IN_TESTED_RANGE = (compile_options.TESTED_JAXLIB[0] <= compile_options._jaxlib_version()
                   < compile_options.TESTED_JAXLIB[1])


def _entry(compiled) -> str:
    """The optimized program's entry computation, without metadata (source locations)."""
    return re.sub(r", metadata=\{[^}]*\}", "", compiled.as_text().split("\nENTRY")[1])


def _conv_relu(x, w):
    return jax.nn.relu(lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC")))


def _cnn_step(conv: str = "xla"):
    """A small CNN's train step and its arguments (conv picked explicitly)."""
    model = models.CNN(10, features=(8, 16), dense=32, conv=conv)
    x = jnp.asarray(np.random.default_rng(0).random((8, 12, 12, 1)), jnp.float32)
    init = functools.partial(create_train_state, model, optax.adam(1e-3))
    state = jax.jit(init, compiler_options={"xla_backend_optimization_level": 0})(
        jax.random.key(0), x[:1])
    batch = {"image": x, "label": jnp.arange(8, dtype=jnp.int32)}
    return functools.partial(train_step, axis_name=None), (state, batch, jax.random.PRNGKey(1))


def _loss_grad(model):
    """A function of nothing: the gradient of ``model``'s cross-entropy on a fixed batch."""
    x = jnp.asarray(np.random.default_rng(0).random((8, 12, 12, 1)), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x[:1])["params"]
    params = jax.tree.map(lambda p: jnp.full(p.shape, 0.01, p.dtype), params)

    def grad():
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
            model.apply({"params": p}, x), jnp.arange(8) % 10).mean()
        return jax.grad(loss)(params)

    return grad


def test_options_on_cpu_only_and_overridable(monkeypatch):
    monkeypatch.delenv(compile_options.ENV, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert compiler_options("gpu") is None and compiler_options("tpu") is None
    assert compiler_options("cpu") == (CPU_CONV_EIGEN if IN_TESTED_RANGE else None)
    assert compiler_options("cpu") is not CPU_CONV_EIGEN  # a copy: callers may merge into it
    monkeypatch.setenv(compile_options.ENV, "xla")
    assert compiler_options("cpu") is None
    monkeypatch.setenv(compile_options.ENV, "eigne")
    with pytest.raises(ValueError, match="JAXTRAIN_XLA_CPU_CONV='eigne'"):
        compiler_options("cpu")
    monkeypatch.setenv(compile_options.ENV, "eigen")
    monkeypatch.setenv("XLA_FLAGS", f"--{KEY}=")  # the user's own choice wins
    assert compiler_options("cpu") is None
    monkeypatch.setattr(compile_options, "_jaxlib_version", lambda: (9, 0))
    monkeypatch.delenv("XLA_FLAGS")
    assert compiler_options("cpu") is None  # defaults of an untested jaxlib: left alone


@pytest.mark.skipif(not IN_TESTED_RANGE, reason="jaxlib outside compile_options.TESTED_JAXLIB")
def test_convolutions_leave_ynnpack_and_nothing_else_moves():
    x = jax.ShapeDtypeStruct((2, 8, 8, 32), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 32, 32), jnp.float32)
    lowered = jax.jit(_conv_relu).lower(x, w)
    default, eigen = _entry(lowered.compile()), _entry(lowered.compile(CPU_CONV_EIGEN))
    assert " convolution(" not in default and "__ynn_fusion" in default  # YNNPACK's
    assert " convolution(" in eigen and "__ynn_fusion" not in eigen  # XLA's own (Eigen)

    # gradients of the CNN (convolutions, pooling, dots, reductions) and of an MLP
    back = {KEY: CPU_CONV_EIGEN[KEY] + ",LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}
    cnn = jax.jit(_loss_grad(models.CNN(10, features=(8, 16), dense=32, conv="xla"))).lower()
    assert _entry(cnn.compile(back)) == _entry(cnn.compile())  # the options = default - conv
    mlp = jax.jit(_loss_grad(models.MLP(10, hidden=(32, 32)))).lower()
    assert _entry(mlp.compile(CPU_CONV_EIGEN)) == _entry(mlp.compile())  # no convs


@pytest.mark.skipif(not IN_TESTED_RANGE, reason="jaxlib outside compile_options.TESTED_JAXLIB")
@pytest.mark.parametrize("kind", ["none", "mesh"])
def test_strategies_compile_with_the_options_and_train_the_same(kind):
    step, args = _cnn_step()
    strategy = create_strategy(kind, 2 if kind == "mesh" else 1)
    compiled = strategy.compile(lambda s, b, k, axis_name: step(s, b, k))
    placed = (strategy.replicate(args[0]), strategy.shard(args[1]), strategy.replicate(args[2]))
    assert " convolution(" in _entry(compiled.lower(*placed).compile())
    new, metrics = compiled(*placed)
    ref, ref_metrics = jax.jit(step)(*args)  # XLA's default lowering (YNNPACK)
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_metrics["loss"]), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         rtol=1e-5, atol=1e-7),
                 strategy.unreplicate(new.params), ref.params)


def test_benchmark_variants_name_the_same_switch():
    from benchmarks import torch_peer

    assert torch_peer.CONV_ENV == compile_options.ENV
    envs = [changes["env"] for changes, _ in torch_peer.CNN_VARIANTS.values() if "env" in changes]
    assert envs and all(env == {compile_options.ENV: "xla"} for env in envs)
