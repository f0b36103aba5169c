"""The pure train and eval steps: learning, metrics, losses, non-finite skipping,
masked eval sums, no retracing, and equivalence under vmap (seeds) and pmap."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtrain.models import create_model
from jaxtrain.optim import create_optimizer, create_schedule
from jaxtrain.state import create_train_state
from jaxtrain.steps import cross_entropy, eval_step, train_step

K = 5
FAST = {"xla_backend_optimization_level": 0}  # initializers compile ~10x faster


def make_batch(n=16, shape=(8, 8, 1), seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, K, n).astype(np.int32)
    images = np.clip(rng.normal(0.5, 0.2, (n, *shape)) + 0.3 * (labels[:, None, None, None] / K),
                     0, 1).astype(np.float32)
    return {"image": images, "label": labels}


class BatchNormNet(nn.Module):
    """Dense -> BatchNorm -> ReLU -> Dense: the step's BatchNorm handling without the
    compile time of a ResNet (resnet_tiny's BatchNorm is tested in test_models)."""

    num_classes: int = K
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dense(16)(x.reshape((x.shape[0], -1)))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=self.axis_name)(x)
        return nn.Dense(self.num_classes)(nn.relu(x))


@functools.cache
def initializer(model="mlp", optimizer="adam", lr=1e-2, shape=(8, 8, 1), dropout=0.0,
                hidden=None, schedule=None):
    """A compiled ``key -> TrainState``. States from one initializer share their static
    model/optimizer objects, so a jitted step compiles once for all of them."""
    if model == "bn":
        net = BatchNormNet()
    else:
        net = create_model(model, K, dropout=dropout, **({"hidden": hidden} if hidden else {}))
    sched = schedule or optax.constant_schedule(lr)
    tx = create_optimizer(optimizer, sched)
    init = jax.jit(functools.partial(create_train_state, net, tx,
                                     sample_images=jnp.zeros((1, *shape)), lr_fn=sched))
    return init.lower(jax.random.key(0)).compile(FAST)


def make_state(model="mlp", *, seed=0, **kwargs):
    return initializer(model, **kwargs)(jax.random.key(seed))


def tree_equal(a, b):
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(x, y), a, b)))


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


@pytest.fixture(scope="module")
def mlp_state():
    return make_state("mlp", hidden=(32,))


@pytest.fixture(scope="module")
def batch():
    return make_batch()


# ----------------------------------------------------------------------------- train_step


def test_train_step_reduces_the_loss_on_a_fixed_batch(mlp_state, batch):
    step = jax.jit(train_step)
    state, first = step(mlp_state, batch, jax.random.key(0))
    assert set(first) == {"loss", "accuracy", "grad_norm", "lr", "nonfinite"}
    assert all(v.shape == () for v in first.values())
    for _ in range(100):
        state, m = step(state, batch, jax.random.key(0))
    assert float(m["loss"]) < 0.1 * float(first["loss"])
    assert float(m["accuracy"]) == 1.0
    assert int(state.step) == 101 and int(m["nonfinite"]) == 0


def test_metrics_match_an_independent_computation():
    sched = create_schedule("cosine", 0.1, 10, warmup_steps=2)
    state = make_state("mlp", optimizer="sgd", schedule=sched, hidden=(16,))
    batch = make_batch()

    def objective(params):
        logits = state.model.apply({"params": params}, batch["image"], train=True)
        return jnp.mean(cross_entropy(logits, batch["label"])), logits

    (loss, logits), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(state.params)
    new, m = jax.jit(train_step)(state, batch, jax.random.key(0))
    assert float(m["loss"]) == pytest.approx(float(loss), rel=1e-5)
    assert float(m["accuracy"]) == pytest.approx(
        float(np.mean(np.argmax(logits, -1) == batch["label"]))
    )
    assert float(m["grad_norm"]) == pytest.approx(float(optax.tree.norm(grads)), rel=1e-5)
    assert float(m["lr"]) == pytest.approx(float(sched(0)))  # lr used by this step: 0 (warmup)
    new2, m2 = jax.jit(train_step)(new, batch, jax.random.key(0))
    assert float(m2["lr"]) == pytest.approx(float(sched(1)), rel=1e-6)
    # SGD: the update is -lr * grad with the schedule's lr at the state's step.
    expected = jax.tree.map(lambda p, g: p - float(sched(1)) * g, new.params,
                            jax.jit(jax.grad(lambda p: objective(p)[0]))(new.params))
    assert_trees_close(new2.params, expected)


def test_label_smoothing_follows_the_formula(mlp_state, batch):
    eps = 0.2
    logits = jax.jit(lambda st, x: st.apply(x, train=True))(mlp_state, batch["image"])
    logp = jax.nn.log_softmax(logits)
    onehot = jax.nn.one_hot(batch["label"], K)
    expected = -jnp.sum(((1 - eps) * onehot + eps / K) * logp, axis=-1)
    np.testing.assert_allclose(cross_entropy(logits, batch["label"], eps), expected, rtol=1e-5)
    _, plain = jax.jit(train_step)(mlp_state, batch, jax.random.key(0))
    _, smooth = jax.jit(functools.partial(train_step, label_smoothing=eps))(
        mlp_state, batch, jax.random.key(0))
    assert float(smooth["loss"]) == pytest.approx(float(jnp.mean(expected)), rel=1e-5)
    assert float(plain["loss"]) == pytest.approx(
        float(jnp.mean(-jnp.sum(onehot * logp, -1))), rel=1e-5)
    assert float(smooth["loss"]) != pytest.approx(float(plain["loss"]))


def test_custom_loss_fn_replaces_cross_entropy():
    state = make_state("mlp", optimizer="sgd", lr=0.5, hidden=(16,))
    batch = make_batch()

    def brier(logits, labels):
        return jnp.sum((jax.nn.softmax(logits) - jax.nn.one_hot(labels, K)) ** 2, -1)

    new, m = jax.jit(functools.partial(train_step, loss_fn=brier))(state, batch, jax.random.key(0))

    def objective(p):
        return jnp.mean(brier(state.model.apply({"params": p}, batch["image"]), batch["label"]))

    loss, grads = jax.jit(jax.value_and_grad(objective))(state.params)
    assert float(m["loss"]) == pytest.approx(float(loss), rel=1e-5)
    expected = jax.tree.map(lambda p, g: p - 0.5 * g, state.params, grads)
    assert_trees_close(new.params, expected)


def test_skip_nonfinite_keeps_the_state_on_a_nan_batch(mlp_state, batch):
    bad = {**batch, "image": batch["image"].copy()}
    bad["image"][3, 2, 2, 0] = np.nan
    skip = jax.jit(functools.partial(train_step, skip_nonfinite=True))
    new, m = skip(mlp_state, bad, jax.random.key(0))
    assert int(m["nonfinite"]) == 1 and not np.isfinite(float(m["loss"]))
    assert tree_equal(new.params, mlp_state.params)
    assert tree_equal(new.opt_state, mlp_state.opt_state)
    assert int(new.step) == int(mlp_state.step) + 1  # the batch is consumed, not retried
    # Without the flag the NaN reaches the params (so the check above can fail).
    poisoned, m2 = jax.jit(train_step)(mlp_state, bad, jax.random.key(0))
    assert int(m2["nonfinite"]) == 1
    assert not all(np.isfinite(x).all() for x in jax.tree.leaves(poisoned.params))
    # A finite batch through the skipping step trains normally.
    good, m3 = skip(mlp_state, batch, jax.random.key(0))
    assert int(m3["nonfinite"]) == 0 and not tree_equal(good.params, mlp_state.params)


def test_skip_nonfinite_keeps_batchnorm_statistics():
    state = make_state("bn", optimizer="sgd", lr=0.1)
    bad = make_batch(8)
    bad["image"][0] = np.inf
    new, m = jax.jit(functools.partial(train_step, skip_nonfinite=True))(
        state, bad, jax.random.key(0))
    assert int(m["nonfinite"]) == 1 and "batch_stats" in state.model_state
    assert tree_equal(new.model_state, state.model_state)
    assert tree_equal(new.params, state.params)
    moved, _ = jax.jit(train_step)(state, make_batch(8), jax.random.key(0))
    assert not tree_equal(moved.model_state, state.model_state)  # a finite batch updates them


def test_train_step_compiles_once_over_many_steps(batch):
    state = make_state("mlp", hidden=(8,))
    step = jax.jit(chex.assert_max_traces(train_step, n=1), donate_argnums=0)
    for i in range(5):
        state, _ = step(state, make_batch(seed=i), jax.random.key(i))
    assert int(state.step) == 5


# ----------------------------------------------------------------------------- eval_step


def test_eval_step_sums_over_unmasked_examples_only(mlp_state, batch):
    n_real = 11
    padded = {k: v.copy() for k, v in batch.items()}
    padded["image"][n_real:] = 0.0  # padding rows hold other data; the mask must drop them
    padded["label"][n_real:] = 0
    mask = (np.arange(16) < n_real).astype(np.float32)
    out = jax.jit(eval_step)(mlp_state, {**padded, "mask": mask})
    logits = jax.jit(lambda st, x: st.apply(x))(mlp_state, batch["image"][:n_real])
    losses = cross_entropy(logits, batch["label"][:n_real])
    assert float(out["count"]) == n_real
    assert float(out["loss_sum"]) == pytest.approx(float(jnp.sum(losses)), rel=1e-5)
    correct = np.sum(np.argmax(logits, -1) == batch["label"][:n_real])
    assert float(out["correct"]) == correct
    nan_padded = {**padded, "image": np.where(mask[:, None, None, None] > 0, padded["image"],
                                               np.nan).astype(np.float32), "mask": mask}
    out_nan = jax.jit(eval_step)(mlp_state, nan_padded)  # padding of any value drops out
    assert {k: float(v) for k, v in out_nan.items()} == {k: float(v) for k, v in out.items()}
    unmasked = jax.jit(eval_step)(mlp_state, batch)
    assert float(unmasked["count"]) == 16
    # Sums combine exactly across batches.
    halves = [jax.jit(eval_step)(mlp_state, {k: v[s] for k, v in batch.items()})
              for s in (slice(0, 8), slice(8, 16))]
    assert float(halves[0]["correct"] + halves[1]["correct"]) == float(unmasked["correct"])
    assert float(halves[0]["loss_sum"] + halves[1]["loss_sum"]) == pytest.approx(
        float(unmasked["loss_sum"]), rel=1e-5)


# ----------------------------------------------------------------------------- vmap over seeds


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


@pytest.mark.parametrize("model,kwargs", [
    ("mlp", {"dropout": 0.3, "hidden": (16,)}),
    pytest.param("resnet_tiny", {"optimizer": "sgd", "lr": 0.1}, marks=pytest.mark.slow),
], ids=["mlp-dropout", "resnet_tiny-batchnorm"])
def test_vmap_over_seeds_equals_per_seed_calls(model, kwargs):
    seeds = [0, 1, 2]
    states = [make_state(model, seed=s, **kwargs) for s in seeds]
    batches = [make_batch(8, seed=s) for s in seeds]  # per-seed data order
    keys = [jax.random.key(10 + s) for s in seeds]
    single = jax.jit(train_step)
    expected = [single(st, b, k) for st, b, k in zip(states, batches, keys, strict=True)]
    jax.block_until_ready(expected)

    def stack_state(sts):
        return sts[0].replace(**{f: _stack([getattr(s, f) for s in sts])
                                 for f in ("step", "params", "model_state", "opt_state")})

    vmapped = jax.jit(jax.vmap(train_step))
    new, metrics = vmapped(stack_state(states), _stack(batches), jnp.stack(keys))
    for i, (st, m) in enumerate(expected):
        got = jax.tree.map(lambda x, i=i: x[i], (new.params, new.model_state, new.opt_state))
        assert_trees_close(got, (st.params, st.model_state, st.opt_state), rtol=1e-5, atol=1e-6)
        for name in m:
            np.testing.assert_allclose(metrics[name][i], m[name], rtol=1e-5, err_msg=name)
    # Seeds really differ (different inits and dropout masks), so the check is not vacuous.
    assert not np.allclose(metrics["loss"][0], metrics["loss"][1])


# ----------------------------------------------------------------------------- pmap


def test_pmap_with_axis_name_equals_one_device_on_the_global_batch():
    """BatchNorm statistics, gradients and metrics are averaged over the device axis."""
    n_dev = 4
    state = make_state("bn", optimizer="sgd", lr=0.1)
    batch = make_batch(16)
    new, m = jax.jit(train_step)(state, batch, jax.random.key(0))
    jax.block_until_ready((new, m))
    devices = jax.devices()[:n_dev]
    replicated = jax.tree.map(lambda x: jnp.stack([x] * n_dev), state)
    shards = jax.tree.map(lambda x: x.reshape(n_dev, -1, *x.shape[1:]), batch)
    keys = jnp.stack([jax.random.key(0)] * n_dev)
    p_new, p_m = jax.pmap(functools.partial(train_step, axis_name="d"), axis_name="d",
                          devices=devices)(replicated, shards, keys)
    jax.block_until_ready((p_new, p_m))
    first = jax.tree.map(lambda x: x[0], (p_new.params, p_new.model_state))
    assert_trees_close(first, (new.params, new.model_state), rtol=1e-4, atol=1e-5)
    for name in ("loss", "accuracy", "grad_norm"):
        np.testing.assert_allclose(p_m[name][0], m[name], rtol=1e-4, err_msg=name)


class NoAxisBatchNormNet(nn.Module):
    """BatchNormNet without an ``axis_name`` field: train_step cannot make it sync."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x.reshape((x.shape[0], -1))))
        return nn.Dense(K)(x)


def test_pmap_warns_about_batchnorm_it_cannot_average_over_devices():
    """Silent per-device statistics would make the result depend on the device count."""
    n_dev = 2
    state = create_train_state(NoAxisBatchNormNet(), optax.sgd(0.1), jax.random.key(0),
                               jnp.zeros((1, 8, 8, 1)))
    replicated = jax.tree.map(lambda x: jnp.stack([x] * n_dev), state)
    shards = jax.tree.map(lambda x: x.reshape(n_dev, -1, *x.shape[1:]), make_batch(8))
    keys = jnp.stack([jax.random.key(0)] * n_dev)
    step = jax.pmap(functools.partial(train_step, axis_name="d"), axis_name="d",
                    devices=jax.devices()[:n_dev])
    with pytest.warns(UserWarning, match="NoAxisBatchNormNet has BatchNorm statistics but no "
                                         "axis_name field"):
        jax.block_until_ready(step(replicated, shards, keys))


# ----------------------------------------------------------------------------- user models


class NoTrainArg(nn.Module):
    """The plainest Linen module: ``__call__(x)``, no ``train`` argument."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(K)(x.reshape((x.shape[0], -1)))


def test_a_linen_module_without_a_train_argument_trains_and_evaluates(batch):
    state = create_train_state(NoTrainArg(), optax.sgd(0.5), jax.random.key(0),
                               jnp.zeros((1, 8, 8, 1)))
    assert jax.tree.map(jnp.shape, state.params) == {"Dense_0": {"bias": (K,), "kernel": (64, K)}}
    step = jax.jit(train_step)
    losses = []
    for i in range(20):
        state, m = step(state, batch, jax.random.key(i))
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.8 * losses[0]
    sums = jax.jit(eval_step)(state, {**batch, "mask": jnp.ones(len(batch["label"]))})
    logits = NoTrainArg().apply({"params": state.params}, batch["image"])
    np.testing.assert_allclose(sums["correct"], np.sum(np.argmax(logits, -1) == batch["label"]))


def test_pmap_dropout_equals_one_device_on_the_global_batch():
    """jaxtrain's models draw their device's rows of the global batch's dropout mask
    (models.Dropout, global_batch_dropout): pmap over 4 devices = one device."""
    n_dev = 4
    state = make_state("mlp", optimizer="sgd", lr=0.1, dropout=0.5, hidden=(32,))
    batch = make_batch(16)
    new, m = jax.jit(train_step)(state, batch, jax.random.key(3))
    replicated = jax.tree.map(lambda x: jnp.stack([x] * n_dev), state)
    shards = jax.tree.map(lambda x: x.reshape(n_dev, -1, *x.shape[1:]), batch)
    keys = jnp.stack([jax.random.key(3)] * n_dev)
    p_new, p_m = jax.pmap(functools.partial(train_step, axis_name="d"), axis_name="d",
                          devices=jax.devices()[:n_dev])(replicated, shards, keys)
    assert_trees_close(jax.tree.map(lambda x: x[0], p_new.params), new.params, rtol=1e-4,
                       atol=1e-5)
    np.testing.assert_allclose(p_m["loss"][0], m["loss"], rtol=1e-5)
    no_dropout = jax.jit(train_step)(make_state("mlp", optimizer="sgd", lr=0.1, hidden=(32,)),
                                     batch, jax.random.key(3))[1]
    assert abs(float(m["loss"]) - float(no_dropout["loss"])) > 1e-3  # dropout was on


def test_models_dropout_draws_nn_dropouts_masks_on_one_device():
    from jaxtrain.models import Dropout

    class Net(nn.Module):
        layer: type

        @nn.compact
        def __call__(self, x):
            return self.layer(0.3)(x, deterministic=False)

    x = jnp.ones((8, 5))
    rngs = {"dropout": jax.random.key(1)}
    ours = Net(Dropout).apply({}, x, rngs=rngs)
    flax = Net(nn.Dropout).apply({}, x, rngs=rngs)
    np.testing.assert_array_equal(ours, flax)
    assert 0 < int(jnp.sum(ours == 0)) < x.size
