"""``jaxtrain.conv``: XLA's convolution forward, its weight gradient as matmuls."""

from __future__ import annotations

import functools
import re

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
NHWC = ("NHWC", "HWIO", "NHWC")


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


@pytest.mark.parametrize("shape, kernel", [((4, 12, 12, 1), (3, 3)), ((2, 9, 7, 3), (3, 3)),
                                           ((3, 8, 8, 4), (2, 2)), ((2, 7, 7, 1), (5, 5))])
def test_conv_taps_is_the_tap_forward_with_conv_nhwcs_backward(shape, kernel):
    """``conv_taps``: ``conv_same(taps=True)``'s values, ``conv_nhwc``'s gradients, exactly."""
    x, k, g = _normal(0, shape), _normal(1, (*kernel, shape[-1], 16)), _normal(2, (*shape[:3], 16))
    nhwc = functools.partial(conv.conv_nhwc, window_strides=(1, 1), padding="SAME",
                             dimension_numbers=NHWC)
    taps = functools.partial(conv.conv_same, taps=True)
    (y_taps, *_), (_, dx_ref, dk_ref), (y, dx, dk) = (
        jax.jit(functools.partial(_value_and_grads, f))(x, k, g)
        for f in (taps, nhwc, conv.conv_taps))
    np.testing.assert_array_equal(y, y_taps)
    np.testing.assert_array_equal(dx, dx_ref)
    np.testing.assert_array_equal(dk, dk_ref)
    y_ref, _, dk_xla = jax.jit(functools.partial(_value_and_grads, _ref))(x, k, g)
    np.testing.assert_allclose(dk, dk_xla, rtol=1e-4, atol=1e-4 * float(jnp.abs(dk_xla).max()))
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(y_ref).max()))
    # under vmap (seed runs) and in bfloat16
    xs, ks = np.stack([x, 2 * x]), np.stack([k, -k])
    ys = jax.jit(jax.vmap(conv.conv_taps))(xs, ks)
    np.testing.assert_allclose(ys[1], -2 * y_taps, rtol=1e-5, atol=1e-5 * float(jnp.abs(y).max()))
    dkb = jax.grad(lambda k: jnp.sum(conv.conv_taps(x.astype(jnp.bfloat16), k)
                                     .astype(jnp.float32)))(k.astype(jnp.bfloat16))
    assert dkb.dtype == jnp.bfloat16
    np.testing.assert_allclose(dkb.astype(jnp.float32), jax.grad(
        lambda k: jnp.sum(_ref(x, k)))(k), rtol=0.05, atol=0.05 * float(jnp.abs(dk).max()))


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


@pytest.mark.parametrize("module", [conv.MatmulGradConv, conv.TapsConv])
def test_matmul_grad_and_taps_convs_have_nn_conv_params_and_outputs(module):
    x = _normal(0, (2, 6, 6, 3))
    ref, ours = nn.Conv(8, (3, 3)), module(8, (3, 3))

    @jax.jit
    def both(key):
        v_ref, v_ours = ref.init(key, x), ours.init(key, x)
        v = jax.tree.map(lambda a: a + 0.1, v_ref)  # a non-zero bias
        return v_ref, v_ours, ref.apply(v, x), ours.apply(v, x)

    v_ref, v_ours, y_ref, y = both(jax.random.key(1))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), v_ref, v_ours))
    if module is conv.MatmulGradConv:
        np.testing.assert_array_equal(y, y_ref)
    else:  # tap sums: XLA's convolution to float rounding
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(y_ref).max()))


def _custom_vjps(model, x) -> int:
    jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x))(jax.eval_shape(model.init,
                                                                        jax.random.key(0), x))
    return str(jaxpr).count("custom_vjp_call")


def test_cnn_conv_auto_picks_a_lowering_per_layer_and_checks_names(monkeypatch):
    x = jnp.zeros((2, 12, 12, 1))
    cnn = models.create_model("cnn", 10).clone(pool="xla")  # conv "auto"; pool without custom_vjp
    assert jax.default_backend() == "cpu" and jax.local_device_count() == 8  # conftest's devices
    # the narrow first layer (C = 1) is conv_taps on CPU (tap sums, Eigen's gradients);
    # the second XLA's convolution with conv_nhwc's backward
    assert compiler_options("cpu") is not None  # jaxtrain's CPU programs run Eigen's convs
    assert (models._auto_conv(True), models._auto_conv(False)) == ("taps_nhwc", "nhwc_vjp")
    assert _custom_vjps(cnn, x) == 2
    assert _custom_vjps(cnn.clone(conv="taps_nhwc"), x) == 2
    assert _custom_vjps(cnn.clone(conv="matmul_grad"), x) == 2
    assert _custom_vjps(cnn.clone(conv="nhwc_vjp"), x) == 2
    assert _custom_vjps(cnn.clone(conv="taps"), x) == 1
    assert _custom_vjps(cnn.clone(conv="xla"), x) == 0
    monkeypatch.setattr(jax, "local_device_count", lambda: 1)
    # one CPU device: XLA's convolution when jaxtrain's programs take Eigen's
    # (compile_options), its weight gradient as matmuls when they keep YNNPACK's
    assert models._auto_conv(False) == (
        "nhwc_vjp" if compiler_options("cpu") is not None else "matmul_grad")
    monkeypatch.setenv(compile_options.ENV, "xla")
    assert models._auto_conv(False) == "matmul_grad"
    assert models._auto_conv(True) == "taps"  # YNNPACK's conv weight gradient lost to a dot
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert _custom_vjps(cnn, x) == 0  # cuDNN's convolutions throughout
    assert models._auto_conv(True) == "xla"
    with pytest.raises(ValueError, match="unknown conv 'fast'"):
        models.CNN(10, conv="fast").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"one per layer \(2\)"):
        models.CNN(10, conv=("taps",)).init(jax.random.key(0), x)
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    # one lowering per layer: conv_same(taps=True), then conv_nhwc's backward: two
    # custom VJPs; XLA's plain convolution, then auto's conv_nhwc: one
    assert _custom_vjps(cnn.clone(conv=("taps", "nhwc_vjp")), x) == 2
    assert _custom_vjps(cnn.clone(conv=("xla", "auto")), x) == 1


def test_cnn_training_steps_match_between_conv_lowerings():
    """Four Adam steps: the matmul weight gradient trains like XLA's (same params, batches)."""
    x = np.abs(_normal(0, (8, 12, 12, 1)))
    y = np.arange(8, dtype=np.int32)
    losses, key = {}, jax.random.key(3)  # no dropout: the key goes unused
    for kind in ("xla", "matmul_grad", "taps", "nhwc_vjp", "taps_nhwc"):
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
    np.testing.assert_allclose(losses["nhwc_vjp"], losses["xla"], rtol=1e-6)
    np.testing.assert_allclose(losses["taps_nhwc"], losses["taps"], rtol=1e-5)
    assert losses["xla"][-1] < losses["xla"][0]


# ----------------------------------------------------------------------------- conv_nhwc

# strides 1 and 2 (and 3x2), 'SAME', 'VALID' and explicit uneven padding, 1x1, even and
# non-square kernels, odd input sizes: JAX's VJP rule in every case a ResNet or CNN has
@pytest.mark.parametrize("shape, kernel, strides, padding", [
    ((2, 9, 9, 8), (3, 3, 8, 16), (1, 1), "SAME"),
    ((2, 9, 7, 3), (3, 3, 3, 4), (2, 2), "SAME"),
    ((2, 8, 8, 4), (1, 1, 4, 8), (2, 2), "VALID"),
    ((2, 8, 8, 2), (4, 4, 2, 3), (1, 1), "SAME"),
    ((1, 11, 10, 2), (5, 3, 2, 3), (3, 2), ((2, 1), (0, 3))),
])
def test_conv_nhwc_is_lax_conv_values_and_gradients(shape, kernel, strides, padding):
    x, k = _normal(1, shape), _normal(2, kernel)

    def run(fn):
        y, vjp = jax.vjp(lambda a, b: fn(a, b, strides, padding, dimension_numbers=NHWC), x, k)
        return (y, *vjp(_normal(3, y.shape)))

    want, got = run(jax.lax.conv_general_dilated), run(conv.conv_nhwc)
    for name, a, b in zip(("y", "dx", "dk"), want, got):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5, err_msg=name)


def test_conv_nhwc_passes_other_convolutions_to_lax_unchanged():
    x, k = _normal(1, (2, 4, 8, 8)), _normal(2, (3, 3, 4, 6))  # NCHW input, HWIO kernel
    for kwargs in ({"dimension_numbers": ("NCHW", "HWIO", "NCHW")},
                   {"dimension_numbers": ("NHWC", "HWIO", "NHWC"), "rhs_dilation": (2, 2)},
                   {"dimension_numbers": ("NHWC", "HWIO", "NHWC"), "feature_group_count": 2}):
        xx = x if kwargs["dimension_numbers"][0] == "NCHW" else x.transpose(0, 2, 3, 1)
        kk = k[:, :, :2] if kwargs.get("feature_group_count") else k
        fn = functools.partial(conv.conv_nhwc, window_strides=(1, 1), padding="SAME", **kwargs)
        assert "custom_vjp_call" not in str(jax.make_jaxpr(fn)(xx, kk)), kwargs
        ref = jax.lax.conv_general_dilated(xx, kk, (1, 1), "SAME", **kwargs)
        np.testing.assert_array_equal(np.asarray(fn(xx, kk)), np.asarray(ref))


def _loop_dim_labels(conv_fn) -> set[str]:
    """The convolutions' layouts after XLA:CPU optimizes 3 gradient steps in a fori_loop."""

    def loss(x, k):
        return jnp.sum(jnp.sin(conv_fn(x, k, (1, 1), "SAME", dimension_numbers=NHWC)))

    def steps(x, k):
        def body(_, xk):
            dx, dk = jax.grad(loss, (0, 1))(*xk)
            return xk[0] - 0.1 * dx, xk[1] - 0.1 * dk
        return jax.lax.fori_loop(0, 3, body, (x, k))

    options = {**(compiler_options("cpu") or {}), **FAST}
    hlo = jax.jit(steps, compiler_options=options).lower(
        _normal(1, (2, 6, 6, 4)), _normal(2, (3, 3, 4, 8))).compile().as_text()
    return set(re.findall(r"dim_labels=([^,\s]+)", hlo))


def test_conv_nhwc_gradients_keep_the_eigen_layout_inside_a_loop():
    """The reason conv_nhwc exists: inside a while loop XLA:CPU leaves JAX's gradient
    convolutions in permuted layouts (its generic emitter: the kernel gradient ~70x
    slower), and conv_nhwc's are all in the one Eigen runs."""
    assert _loop_dim_labels(conv.conv_nhwc) == {"b01f_01io->b01f"}
    if not _loop_dim_labels(jax.lax.conv_general_dilated) - {"b01f_01io->b01f"}:
        import warnings  # seen with jaxlib 0.10.2; a later XLA may canonicalize in loops

        warnings.warn("XLA:CPU now keeps lax's gradient convolutions in Eigen's layout "
                      "inside loops: conv.conv_nhwc may no longer be needed", stacklevel=1)


def test_resnet_nhwc_vjp_convs_train_like_nn_conv():
    x = np.abs(_normal(0, (4, 8, 8, 3)))
    y = np.arange(4, dtype=np.int32)
    out = {}
    for kind in ("xla", "nhwc_vjp"):
        model = models.create_model("resnet_tiny", 10).clone(conv=kind)
        init = functools.partial(create_train_state, model, optax.adam(1e-3))
        state = jax.jit(init, compiler_options=FAST)(jax.random.key(2), x[:1])
        step = jax.jit(train_step, compiler_options=FAST)
        for _ in range(2):
            state, m = step(state, {"image": x, "label": y}, jax.random.key(3))
        out[kind] = (float(m["loss"]), state.params)
    assert jax.tree.structure(out["xla"][1]) == jax.tree.structure(out["nhwc_vjp"][1])
    assert out["nhwc_vjp"][0] == pytest.approx(out["xla"][0], rel=1e-6)
    for a, b in zip(jax.tree.leaves(out["xla"][1]), jax.tree.leaves(out["nhwc_vjp"][1])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    assert _custom_vjps(models.create_model("resnet_tiny", 10), x) > 0  # auto on CPU
    with pytest.raises(ValueError, match="unknown conv 'fast'"):
        models.create_model("resnet_tiny", 10).clone(conv="fast").init(jax.random.key(0), x)


def test_conv_nhwc_under_vmap_is_each_seed_alone():
    """Seed runs vmap the step over stacked params: each slice's gradients as if alone."""
    xs, ks = _normal(1, (2, 3, 8, 8, 4)), _normal(2, (2, 3, 3, 4, 5))

    def loss(x, k):
        return jnp.sum(jnp.sin(conv.conv_nhwc(x, k, (2, 2), "SAME", dimension_numbers=NHWC)))

    batched = jax.vmap(jax.grad(loss, (0, 1)))(xs, ks)
    for i in range(2):
        for got, want in zip((batched[0][i], batched[1][i]), jax.grad(loss, (0, 1))(xs[i], ks[i])):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_conv_nhwc_vmap_runs_one_convolution_per_model_and_folds_shared_weights(monkeypatch):
    """Both operands vmapped (seeds): a loop of plain convolutions, not XLA's grouped one
    (slower on XLA:CPU); the input alone vmapped (perturbations through one model): JAX's
    rule, one convolution over the folded batch; nested: each slice as if alone."""
    xs, ks = _normal(1, (3, 2, 6, 6, 4)), _normal(2, (3, 3, 3, 4, 5))

    def loss(x, k):
        return jnp.sum(jnp.sin(conv.conv_nhwc(x, k, (1, 1), "SAME", dimension_numbers=NHWC)))

    grads = jax.grad(loss, (0, 1))
    # (an attack's input gradient through one model; each slice's kernel gradient would
    # pair two vmapped activations, a loop again)
    for per_seed, fn, k in ((True, jax.vmap(grads), ks),
                            (False, jax.vmap(jax.grad(loss), (0, None)), ks[0])):
        hlo = jax.jit(fn).lower(xs, k).as_text()
        groups = {int(n) for n in re.findall(r"(?:feature|batch)_group_count = (\d+)", hlo)}
        assert groups <= {1}, groups
        assert ("stablehlo.while" in hlo) == per_seed
        if not per_seed:  # the shared kernel's convolutions run on the folded batch (3 x 2)
            assert "tensor<6x6x6x4xf32>" in hlo
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # measured on CPU only
    hlo = jax.jit(jax.vmap(grads)).lower(xs, ks).as_text()
    assert "stablehlo.while" not in hlo and "feature_group_count = 3" in hlo
    monkeypatch.undo()
    # nested: seeds (outer) x perturbed inputs (inner), values and gradients
    xss = np.stack([xs, 2 * xs])  # [2 perturbations, 3 seeds, B, H, W, C]
    got = jax.vmap(jax.vmap(grads), (0, None))(xss, ks)
    for p in range(2):
        for s in range(3):
            for a, b in zip((got[0][p, s], got[1][p, s]), grads(xss[p, s], ks[s])):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
