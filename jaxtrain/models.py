"""Flax models and the registry that picks them by name.

Every model takes images in [0, 1] shaped ``[B, H, W, C]`` and returns logits
``[B, num_classes]`` in float32. Input standardization (train-split mean/std)
is the model's first operation, so a trained model is a function of raw
images: the robustness suite perturbs in [0, 1] and calls the same model.

``axis_name`` names the device axis for BatchNorm statistics under ``pmap``
(``train_step`` clones the model with it), so BatchNorm always normalizes over
the global batch. Under ``jit`` over a mesh XLA reduces over the sharded batch
by itself and ``axis_name`` stays ``None``. Dropout (``Dropout``) likewise draws
the global batch's mask under ``pmap`` and keeps this device's rows, so a run's
result does not depend on the device count.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtrain.compile_options import compiler_options
from jaxtrain.conv import MatmulGradConv, TapsConv, conv_nhwc, is_narrow, nn_conv_params
from jaxtrain.data import global_batch_rows
from jaxtrain.pooling import relu_max_pool_2x2

Dtype = Any


class Standardize(nn.Module):
    """``(x - mean) / std`` with fixed per-channel statistics ``[C]``."""

    mean: Sequence[float] = (0.0,)
    std: Sequence[float] = (1.0,)

    @nn.compact
    def __call__(self, x_BHWC: jnp.ndarray) -> jnp.ndarray:
        mean = jnp.asarray(self.mean, jnp.float32).reshape((1, 1, 1, -1))
        std = jnp.asarray(self.std, jnp.float32).reshape((1, 1, 1, -1))
        return (x_BHWC.astype(jnp.float32) - mean) / std


class Dropout(nn.Module):
    """``nn.Dropout`` (the same masks on one device) whose mask under ``pmap``
    (``axis_name`` set) is this device's rows of the mask drawn for the global batch
    ``[devices * B, ...]``: what one device would draw, at ``devices`` times the random
    bits per device. ``train_step`` gives a model that says so
    (``global_batch_dropout``) the step's key unfolded, the same on every device."""

    rate: float
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, deterministic: bool) -> jnp.ndarray:
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        rng = self.make_rng("dropout")
        mask = global_batch_rows(lambda n: jax.random.bernoulli(rng, keep, (n, *x.shape[1:])),
                                 x.shape[0], self.axis_name)
        return jax.lax.select(mask, x / keep, jnp.zeros_like(x))


class MLP(nn.Module):
    """Flatten, ``len(hidden)`` ReLU layers with optional dropout, linear head."""

    global_batch_dropout: ClassVar[bool] = True  # Dropout: see train_step

    num_classes: int
    hidden: Sequence[int] = (256, 256)
    dropout: float = 0.0
    mean: Sequence[float] = (0.0,)
    std: Sequence[float] = (1.0,)
    dtype: Dtype = jnp.float32
    axis_name: str | None = None  # dropout's device axis under pmap (no BatchNorm)

    @nn.compact
    def __call__(self, x_BHWC: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = Standardize(self.mean, self.std)(x_BHWC).astype(self.dtype)
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(nn.Dense(width, dtype=self.dtype)(x))
            if self.dropout:
                x = Dropout(self.dropout, self.axis_name)(x, deterministic=not train)
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class Im2ColConv(nn.Module):
    """A stride-1 'SAME' convolution as patches + one matmul (im2col).

    Same parameters as ``nn.Conv`` (``kernel [kh, kw, C, F]``, ``bias [F]``, float32)
    and the same function, so the two are interchangeable in a checkpoint; only
    XLA's lowering differs (a dot instead of a convolution)."""

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC: jnp.ndarray) -> jnp.ndarray:
        kernel, bias = nn_conv_params(self, x_BHWC.shape[-1])
        # patches_BHW(C*kh*kw): feature order is (C, kh, kw)
        patches = jax.lax.conv_general_dilated_patches(
            x_BHWC.astype(self.dtype), self.kernel_size, (1, 1), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        kernel_KF = jnp.transpose(kernel, (2, 0, 1, 3)).reshape((-1, self.features))
        y = jnp.dot(patches, kernel_KF.astype(self.dtype))
        return y + bias.astype(self.dtype).reshape((1, 1, 1, -1))


def _auto_conv(narrow: bool) -> str:
    """``CNN(conv="auto")``'s lowering of one convolution (see ``CNN``)."""
    if jax.default_backend() != "cpu":
        return "xla"
    if narrow:  # Eigen's weight gradient where jaxtrain's programs run Eigen convolutions
        return "taps" if compiler_options("cpu") is None else "taps_nhwc"
    one_device = jax.local_device_count() == 1
    return "matmul_grad" if one_device and compiler_options("cpu") is None else "nhwc_vjp"


# XLA's convolution with conv.conv_nhwc's backward: nn.Conv's parameters and values,
# gradients XLA:CPU keeps on Eigen inside loops (fused steps, attacks, seed chunks).
NhwcVjpConv = functools.partial(nn.Conv, conv_general_dilated=conv_nhwc)


class CNN(nn.Module):
    """Small LeNet-style CNN: two conv(3x3)+ReLU+maxpool blocks, dense, head.

    ``conv`` picks how the convolutions lower, one name for every layer or a tuple
    with one per layer, all with ``nn.Conv``'s parameters (checkpoints do not care
    which; measurements: ``jaxtrain.conv``):

    - ``"xla"``: XLA's convolution;
    - ``"nhwc_vjp"``: XLA's, with ``conv.conv_nhwc``'s backward (the gradients in the
      layout XLA:CPU runs on Eigen inside loops too);
    - ``"matmul_grad"``: XLA's, with its weight gradient as matmuls
      (``conv.conv_same``);
    - ``"taps"``: layers with a narrow input (``kh * kw * C <= 32``: the first)
      as ``conv_same(taps=True)``, broadcast multiply-adds with the matmul weight
      gradient; the others XLA's;
    - ``"taps_nhwc"``: narrow layers as ``conv.TapsConv`` (the same forward with
      ``conv_nhwc``'s backward), the others ``"nhwc_vjp"``;
    - ``"im2col"``: patches + one matmul (``Im2ColConv``);
    - ``"auto"`` (default): on GPUs ``"xla"``; on CPU the narrow first layer as
      ``"taps_nhwc"`` where jaxtrain's programs run Eigen's convolutions
      (``compile_options.compiler_options``), else ``"taps"``; the others
      ``"nhwc_vjp"``, or ``"matmul_grad"`` on a single CPU device whose programs keep
      XLA's YNNPACK convolutions, where that was 1.28-1.5x faster.

    ``pool="elementwise"`` (default) is ``pooling.relu_max_pool_2x2``: ReLU and
    ``nn.max_pool`` in one, the same values and gradients, with an elementwise
    backward that keeps one byte per output (``select_and_scatter``'s backward took
    ~100 ms of a ~230 ms step on XLA:CPU); ``"xla"`` is ``nn.relu`` then
    ``nn.max_pool``."""

    global_batch_dropout: ClassVar[bool] = True  # Dropout: see train_step

    num_classes: int
    features: Sequence[int] = (32, 64)
    dense: int = 128
    dropout: float = 0.0
    mean: Sequence[float] = (0.0,)
    std: Sequence[float] = (1.0,)
    dtype: Dtype = jnp.float32
    axis_name: str | None = None
    conv: str | tuple[str, ...] = "auto"
    pool: str = "elementwise"

    @nn.compact
    def __call__(self, x_BHWC: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        convs = {"xla": nn.Conv, "nhwc_vjp": NhwcVjpConv, "matmul_grad": MatmulGradConv,
                 "im2col": Im2ColConv,
                 "taps": functools.partial(MatmulGradConv, taps=True), "taps_nhwc": TapsConv}
        kinds = ((self.conv,) * len(self.features) if isinstance(self.conv, str)
                 else tuple(self.conv))
        if (len(kinds) != len(self.features) or any(k not in ("auto", *convs) for k in kinds)
                or self.pool not in ("elementwise", "xla")):
            raise ValueError(f"CNN: unknown conv {self.conv!r} or pool {self.pool!r}; conv is "
                             f"one of {['auto', *convs]} or one per layer "
                             f"({len(self.features)}), pool 'elementwise' or 'xla'")
        x = Standardize(self.mean, self.std)(x_BHWC).astype(self.dtype)
        for i, (f, kind) in enumerate(zip(self.features, kinds)):
            if kind == "auto":
                kind = _auto_conv(is_narrow((3, 3), x.shape[-1]))
            elif kind in ("taps", "taps_nhwc") and not is_narrow((3, 3), x.shape[-1]):
                # taps only where the input is narrow (the first layer)
                kind = "xla" if kind == "taps" else "nhwc_vjp"
            x = convs[kind](f, (3, 3), dtype=self.dtype, name=f"Conv_{i}")(x)
            if min(x.shape[1:3]) < 2:
                x = nn.relu(x)
            elif self.pool == "xla":
                x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
            else:
                x = relu_max_pool_2x2(x)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.dense, dtype=self.dtype)(x))
        if self.dropout:
            x = Dropout(self.dropout, self.axis_name)(x, deterministic=not train)
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class ResidualBlock(nn.Module):
    """Basic ResNet block (two 3x3 convs), projection shortcut when shapes change."""

    features: int
    strides: int
    norm: Callable[..., nn.Module]
    dtype: Dtype = jnp.float32
    conv: Callable[..., nn.Module] = nn.Conv

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype)
        y = conv(self.features, (3, 3), strides=self.strides)(x)
        y = nn.relu(self.norm()(y))
        y = conv(self.features, (3, 3))(y)
        y = self.norm(scale_init=nn.initializers.zeros)(y)
        if x.shape != y.shape:
            x = self.norm()(conv(self.features, (1, 1), strides=self.strides)(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem (no max-pool), stages of basic blocks, BatchNorm.

    ``conv``: ``"xla"`` (``nn.Conv``), ``"nhwc_vjp"`` (``nn.Conv`` with
    ``conv.conv_nhwc``'s backward) or ``"auto"`` (default): ``"nhwc_vjp"`` on CPU,
    ``"xla"`` elsewhere. The same parameters either way."""

    global_batch_dropout: ClassVar[bool] = True  # Dropout: see train_step

    num_classes: int
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    width: int = 64
    dropout: float = 0.0
    mean: Sequence[float] = (0.0,)
    std: Sequence[float] = (1.0,)
    dtype: Dtype = jnp.float32
    axis_name: str | None = None
    conv: str = "auto"

    @nn.compact
    def __call__(self, x_BHWC: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        kind = self.conv
        if kind == "auto":
            kind = "nhwc_vjp" if jax.default_backend() == "cpu" else "xla"
        if kind not in ("xla", "nhwc_vjp"):
            raise ValueError(f"ResNet: unknown conv {self.conv!r}; one of 'auto', 'xla', "
                             "'nhwc_vjp'")
        conv = NhwcVjpConv if kind == "nhwc_vjp" else nn.Conv
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
            axis_name=self.axis_name,
        )
        x = Standardize(self.mean, self.std)(x_BHWC).astype(self.dtype)
        x = conv(self.width, (3, 3), use_bias=False, dtype=self.dtype)(x)
        x = nn.relu(norm()(x))
        for i, blocks in enumerate(self.stage_sizes):
            for j in range(blocks):
                strides = 2 if i > 0 and j == 0 else 1
                x = ResidualBlock(self.width * 2**i, strides, norm, self.dtype, conv)(x)
        x = jnp.mean(x, axis=(1, 2))
        if self.dropout:
            x = Dropout(self.dropout, self.axis_name)(x, deterministic=not train)
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    "resnet18": functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), width=64),
    "resnet_tiny": functools.partial(ResNet, stage_sizes=(1, 1), width=8),
}


def create_model(
    name: str,
    num_classes: int,
    *,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
    dropout: float = 0.0,
    dtype: Dtype = jnp.float32,
    **kwargs: Any,
) -> nn.Module:
    """Builds registry model ``name``; raises ``ValueError`` naming the valid ones."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](
        num_classes=num_classes,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        dropout=dropout,
        dtype=dtype,
        **kwargs,
    )
