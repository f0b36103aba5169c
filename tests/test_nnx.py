"""NNX models through the same pure train step: equal to the Linen model with the same
weights, trained end to end on digits, custom losses, seeds, pmap BatchNorm."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtrain import create_train_state, eval_step, load_dataset, train_step
from jaxtrain.models import MLP
from jaxtrain.nnx_bridge import NNXModel
from jaxtrain.parallel import create_strategy


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


class NNXMLP(nnx.Module):
    """The Linen ``MLP`` (no standardization: mean 0, std 1) written in NNX."""

    def __init__(self, hidden: tuple[int, ...], num_classes: int, *, rngs: nnx.Rngs,
                 in_features: int = 64):
        sizes = (in_features, *hidden)
        self.hidden = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(sizes)])
        self.head = nnx.Linear(sizes[-1], num_classes, rngs=rngs)

    def __call__(self, x_BHWC):
        x = x_BHWC.reshape((x_BHWC.shape[0], -1))
        for layer in self.hidden:
            x = nnx.relu(layer(x))
        return self.head(x)


class BNDropNet(nnx.Module):
    """BatchNorm + Dropout: state besides params, and per-step randomness."""

    def __init__(self, *, rngs: nnx.Rngs, dropout: float = 0.1):
        self.l1 = nnx.Linear(64, 64, rngs=rngs)
        self.bn = nnx.BatchNorm(64, momentum=0.9, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.l2 = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x_BHWC, train: bool = False):
        x = x_BHWC.reshape((x_BHWC.shape[0], -1))
        return self.l2(self.drop(nnx.relu(self.bn(self.l1(x)))))


def _batches(split, batch_size, steps, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(split["label"]), batch_size)
        yield {k: v[idx] for k, v in split.items()}


def _accuracy(state, split) -> float:
    sums = jax.jit(eval_step)(state, split)
    return float(sums["correct"] / sums["count"])


def test_nnx_equals_linen_with_same_weights(digits):
    """Five Adam steps of the NNX port and of the Linen MLP, from the same weights."""
    linen = MLP(num_classes=10, hidden=(32, 16))
    tx = optax.adam(1e-2)
    sample = digits.train["image"][:1]
    s_linen = create_train_state(linen, tx, jax.random.key(0), sample)
    net = NNXMLP((32, 16), 10, rngs=nnx.Rngs(1))
    p = s_linen.params
    for layer, name in zip([*net.hidden, net.head], ["Dense_0", "Dense_1", "Dense_2"]):
        layer.kernel.set_value(p[name]["kernel"])
        layer.bias.set_value(p[name]["bias"])
    s_nnx = create_train_state(net, tx, jax.random.key(123), sample)
    assert isinstance(s_nnx.model, NNXModel)
    step = jax.jit(train_step)
    for i, batch in enumerate(_batches(digits.train, 32, 5)):
        s_linen, m_linen = step(s_linen, batch, jax.random.key(i))
        s_nnx, m_nnx = step(s_nnx, batch, jax.random.key(i))
        np.testing.assert_allclose(m_nnx["loss"], m_linen["loss"], rtol=1e-5)
        np.testing.assert_allclose(m_nnx["grad_norm"], m_linen["grad_norm"], rtol=1e-5)
    flat_nnx = s_nnx.params
    for i, name in enumerate(["Dense_0", "Dense_1"]):
        for k in ("kernel", "bias"):
            np.testing.assert_allclose(flat_nnx["hidden"][str(i)][k], s_linen.params[name][k],
                                       rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(flat_nnx["head"]["kernel"], s_linen.params["Dense_2"]["kernel"],
                               rtol=1e-5, atol=1e-6)
    assert int(s_nnx.step) == 5


def test_nnx_model_trains_end_to_end_on_digits(digits):
    """BatchNorm + Dropout NNX model, the same jitted train_step: loss falls, test accuracy high."""
    model = NNXModel(lambda rngs: BNDropNet(rngs=rngs))
    state = create_train_state(model, optax.adam(5e-3), jax.random.key(0),
                               digits.train["image"][:1])
    assert set(state.model_state) == {"nnx_state"}
    bn_mean0 = np.asarray(state.model_state["nnx_state"]["bn"]["mean"])
    step = jax.jit(train_step, donate_argnums=(0,))
    losses = []
    for i, batch in enumerate(_batches(digits.train, 64, 200)):
        state, m = step(state, batch, jax.random.key(i))
        losses.append(float(m["loss"]))
    assert np.mean(losses[-20:]) < 0.25 * np.mean(losses[:5]), (losses[:5], losses[-20:])
    assert not np.allclose(state.model_state["nnx_state"]["bn"]["mean"], bn_mean0)  # stats moved
    assert _accuracy(state, digits.test) > 0.93


def test_custom_loss_is_used_and_trains(digits):
    """A multiclass hinge loss replaces cross-entropy: the reported loss is the hinge loss."""

    def hinge(logits_BK, labels_B):
        return optax.losses.multiclass_hinge_loss(logits_BK, labels_B)

    model = NNXModel(lambda rngs: NNXMLP((64,), 10, rngs=rngs))
    state = create_train_state(model, optax.adam(5e-3), jax.random.key(0),
                               digits.train["image"][:1])
    batch = next(_batches(digits.train, 64, 1))
    logits = state.apply(batch["image"])
    want = float(jnp.mean(hinge(logits, batch["label"])))
    ce = float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])))
    step = jax.jit(functools.partial(train_step, loss_fn=hinge))
    _, m = step(state, batch, jax.random.key(0))
    np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-5)
    assert abs(want - ce) > 1e-2  # the check above can tell the two losses apart
    for i, b in enumerate(_batches(digits.train, 64, 150)):
        state, m = step(state, b, jax.random.key(i))
    assert _accuracy(state, digits.test) > 0.9


def test_factory_init_is_a_function_of_the_key_and_instances_keep_their_weights(digits):
    sample = digits.train["image"][:1]
    model = NNXModel(lambda rngs: NNXMLP((8,), 10, rngs=rngs))
    init = jax.jit(functools.partial(create_train_state, model, optax.sgd(0.1),
                                     sample_images=sample))
    a, b, a2 = init(jax.random.key(1)), init(jax.random.key(2)), init(jax.random.key(1))
    k = lambda s: np.asarray(s.params["hidden"]["0"]["kernel"])
    np.testing.assert_array_equal(k(a), k(a2))
    assert not np.allclose(k(a), k(b))
    # vmap over seeds (the seed runs' init) gives each seed its own single-run init
    stacked = jax.jit(jax.vmap(init))(jnp.stack([jax.random.key(1), jax.random.key(2)]))
    np.testing.assert_array_equal(k(stacked)[0], k(a))
    np.testing.assert_array_equal(k(stacked)[1], k(b))
    net = NNXMLP((8,), 10, rngs=nnx.Rngs(7))
    s = create_train_state(net, optax.sgd(0.1), jax.random.key(1), sample)
    np.testing.assert_array_equal(s.params["head"]["kernel"], net.head.kernel.get_value())


def test_dropout_randomness_comes_from_the_step_key(digits):
    model = NNXModel(lambda rngs: BNDropNet(rngs=rngs, dropout=0.5))
    state = create_train_state(model, optax.sgd(0.1), jax.random.key(0), digits.train["image"][:1])
    batch = next(_batches(digits.train, 64, 1))
    step = jax.jit(train_step)
    loss = lambda key: float(step(state, batch, key)[1]["loss"])
    assert loss(jax.random.key(3)) == loss(jax.random.key(3))
    assert loss(jax.random.key(3)) != loss(jax.random.key(4))
    assert loss(jax.random.PRNGKey(3)) == loss(jax.random.PRNGKey(3))  # raw uint32[2] keys too
    out = jax.jit(state.apply)(batch["image"])  # eval mode: deterministic, running statistics
    np.testing.assert_array_equal(out, jax.jit(state.apply)(batch["image"]))


def test_pmap_batchnorm_uses_the_global_batch(digits):
    """Under pmap the NNX BatchNorm gets the axis name: 4 devices x 16 == one device x 64."""
    model = NNXModel(lambda rngs: BNDropNet(rngs=rngs, dropout=0.0))
    state = create_train_state(model, optax.sgd(0.1), jax.random.key(0), digits.train["image"][:1])
    batch = next(_batches(digits.train, 64, 1))
    one, m_one = jax.jit(train_step)(state, batch, jax.random.key(0))
    jax.block_until_ready(one)  # never interleave the single-device and pmapped programs
    strategy = create_strategy("pmap", 4)
    step = strategy.compile(train_step)
    many, m_many = step(strategy.replicate(state), strategy.shard(batch),
                        strategy.replicate(jax.random.key_data(jax.random.key(0))))
    many = strategy.unreplicate(many)
    np.testing.assert_allclose(strategy.unreplicate(m_many)["loss"], m_one["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(many.model_state), jax.tree.leaves(one.model_state),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(many.params), jax.tree.leaves(one.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_nnx_state_checkpoints_with_orbax(tmp_path, digits):
    """List-held layers become string keys ("0", "1"): Orbax saves and restores them."""
    import orbax.checkpoint as ocp

    net = NNXMLP((8, 8), 10, rngs=nnx.Rngs(0))
    state = create_train_state(net, optax.adam(1e-3), jax.random.key(0), digits.train["image"][:1])
    tree = {"params": state.params, "opt_state": state.opt_state}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ckpt", tree)
        ckptr.wait_until_finished()
        restored = ckptr.restore(tmp_path / "ckpt", jax.tree.map(np.asarray, tree))
    assert set(restored["params"]["hidden"]) == {"0", "1"}
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(tree), strict=True):
        np.testing.assert_array_equal(a, b)
