"""Models: registry output shapes, BatchNorm updates, dropout, bf16 compute, standardization."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain.models import MODELS, create_model

SHAPES = [(8, 8, 1), (28, 28, 1), (32, 32, 3)]
# Initializers compile ~10x faster without LLVM optimization (init runs once).
FAST = {"xla_backend_optimization_level": 0}


def init(model, x, seed=1):
    args = ({"params": jax.random.key(seed)}, x)
    return jax.jit(model.init).lower(*args).compile(FAST)(*args)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_registry_models_map_images_to_float32_logits(name, shape):
    model = create_model(name, 7)
    x = jax.ShapeDtypeStruct((3, *shape), jnp.float32)
    # Shapes only (no compile): init, then apply in both modes.
    variables = jax.eval_shape(lambda k, x: model.init({"params": k}, x), jax.random.key(0), x)
    for train in (False, True):
        out = jax.eval_shape(
            lambda v, x, t=train: model.apply(
                v, x, train=t, mutable=["batch_stats"] if t else False,
                rngs={"dropout": jax.random.key(1)},
            ),
            variables, x,
        )
        logits = out[0] if train else out
        assert logits.shape == (3, 7) and logits.dtype == jnp.float32
    has_bn = "batch_stats" in variables
    assert has_bn == name.startswith("resnet")


def test_resnet18_is_resnet18_sized():
    model = create_model("resnet18", 10)
    variables = jax.eval_shape(
        lambda k: model.init({"params": k}, jnp.zeros((1, 32, 32, 3))), jax.random.key(0)
    )
    n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))
    assert 11.0e6 < n < 11.3e6, n  # the CIFAR ResNet-18 has ~11.17M parameters


@pytest.fixture(scope="module")
def tiny_resnet():
    model = create_model("resnet_tiny", 4)
    x = jax.random.uniform(jax.random.key(0), (6, 8, 8, 3))
    return model, init(model, x), x


def test_batchnorm_statistics_update_in_train_mode_only(tiny_resnet):
    model, variables, x = tiny_resnet
    stats0 = variables["batch_stats"]

    @jax.jit
    def train_apply(v, x):
        return model.apply(v, x, train=True, mutable=["batch_stats"], capture_intermediates=True)

    (_, state) = train_apply(variables, x)
    stats1 = state["batch_stats"]
    # The first BatchNorm follows the stem conv: running mean moves by
    # (1 - momentum) = 0.1 of that conv output's batch mean, from 0.
    stem = state["intermediates"]["Conv_0"]["__call__"][0]
    expected_mean = 0.1 * jnp.mean(stem, axis=(0, 1, 2))
    np.testing.assert_allclose(stats1["BatchNorm_0"]["mean"], expected_mean, rtol=1e-4, atol=1e-6)
    expected_var = 0.9 * 1.0 + 0.1 * jnp.var(stem, axis=(0, 1, 2))
    np.testing.assert_allclose(stats1["BatchNorm_0"]["var"], expected_var, rtol=1e-4)
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), stats0, stats1)
    assert all(jax.tree.leaves(changed))

    # Eval mode uses the running statistics: outputs are per-example (batch-independent).
    apply_eval = jax.jit(lambda v, x: model.apply(v, x, train=False))
    full = apply_eval(variables, x)
    np.testing.assert_allclose(apply_eval(variables, x[:2]), full[:2], rtol=1e-5, atol=1e-6)
    # Train mode normalizes with batch statistics: the same examples in another batch differ.
    apply_train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[0])
    assert not np.allclose(apply_train(variables, x)[:2], apply_train(variables, x[:2]))


def test_dropout_is_active_only_in_train_mode():
    model = create_model("mlp", 5, dropout=0.5)
    x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1))
    variables = init(model, x)

    @functools.partial(jax.jit, static_argnames="train")
    def apply(v, x, key, train):
        return model.apply(v, x, train=train, rngs={"dropout": key})

    e1 = apply(variables, x, jax.random.key(2), False)
    e2 = apply(variables, x, jax.random.key(3), False)
    np.testing.assert_array_equal(e1, e2)
    t1 = apply(variables, x, jax.random.key(2), True)
    t2 = apply(variables, x, jax.random.key(3), True)
    assert not np.allclose(t1, t2) and not np.allclose(t1, e1)
    np.testing.assert_array_equal(t1, apply(variables, x, jax.random.key(2), True))
    # Without dropout the train and eval outputs are the same function.
    plain = create_model("mlp", 5)
    apply_plain = jax.jit(plain.apply, static_argnames="train")
    np.testing.assert_allclose(
        apply_plain(variables, x, train=True), apply_plain(variables, x), rtol=1e-6
    )


@pytest.mark.parametrize("name", ["mlp", "resnet_tiny"])
def test_bfloat16_computes_in_bf16_with_float32_params(name):
    model = create_model(name, 3, dtype=jnp.bfloat16)
    x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 1))
    variables = init(model, x)
    assert {p.dtype for p in jax.tree.leaves(variables["params"])} == {jnp.dtype(jnp.float32)}
    logits, state = jax.jit(
        lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"])
    )(variables, x)
    assert logits.dtype == jnp.float32
    inter = state["intermediates"]
    layer = "Dense_0" if name == "mlp" else "Conv_0"
    assert inter[layer]["__call__"][0].dtype == jnp.bfloat16
    # Same params in float32 give close (not identical) logits.
    ref = jax.jit(create_model(name, 3).apply)(variables, x)
    np.testing.assert_allclose(logits, ref, rtol=0.1, atol=0.1)
    assert not np.array_equal(logits, ref)


def test_standardization_is_the_first_operation():
    mean, std = (0.3,), (0.2,)
    x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1))
    with_stats = create_model("mlp", 3, mean=mean, std=std)
    plain = create_model("mlp", 3)
    variables = init(plain, x)
    np.testing.assert_allclose(
        jax.jit(with_stats.apply)(variables, x), jax.jit(plain.apply)(variables, (x - 0.3) / 0.2),
        rtol=1e-5, atol=1e-5,
    )


def test_unknown_model_name_lists_the_registry():
    with pytest.raises(ValueError, match="unknown model 'vgg'.*mlp"):
        create_model("vgg", 10)
