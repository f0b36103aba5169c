"""The training state pytree and its constructor."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

PyTree = Any


class TrainState(struct.PyTreeNode):
    """Everything that changes during training, plus the static functions using it.

    Leaves: ``step`` (int32 scalar), ``params``, ``model_state`` (non-trained
    collections such as ``batch_stats``; ``{}`` when there are none) and
    ``opt_state``. ``model``, ``tx`` and ``lr_fn`` are static (not leaves), so
    the state can be jitted, pmapped, sharded, vmapped over seeds and
    checkpointed as a plain pytree.
    """

    step: jnp.ndarray
    params: PyTree
    model_state: PyTree
    opt_state: PyTree
    model: nn.Module = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    lr_fn: Callable[[jnp.ndarray], jnp.ndarray] | None = struct.field(
        pytree_node=False, default=None
    )

    def apply(self, images: jnp.ndarray, *, train: bool = False, **kwargs: Any) -> Any:
        """Evaluation-mode logits ``[B, K]`` for images ``[B, H, W, C]`` in [0, 1]."""
        return self.model.apply(
            {"params": self.params, **self.model_state}, images,
            **train_kwargs(self.model, train), **kwargs,
        )


@functools.cache
def takes_train(cls: type) -> bool:
    """Whether ``cls.__call__`` accepts ``train=`` (by name or through ``**kwargs``)."""
    try:
        params = inspect.signature(cls.__call__).parameters
    except (TypeError, ValueError):
        return False
    return "train" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def train_kwargs(model: Any, train: bool) -> dict[str, bool]:
    """``{"train": train}`` for the model's ``init``/``apply``; ``{}`` for a Linen module
    whose ``__call__`` has no ``train`` argument (nothing in it differs between training
    and evaluation). An ``NNXModel`` takes ``train`` and decides for its module."""
    if isinstance(model, nn.Module) and not takes_train(type(model)):
        return {}
    return {"train": train}


def create_train_state(
    model: Any,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    sample_images: jnp.ndarray,
    *,
    lr_fn: Callable[[jnp.ndarray], jnp.ndarray] | None = None,
) -> TrainState:
    """Initializes params (and BatchNorm statistics) from ``rng``.

    ``model`` is a Flax Linen module, a Flax NNX module (its current weights are
    the initial params) or a ``jaxtrain.nnx_bridge.NNXModel`` (an NNX factory
    initialized from ``rng``). Its ``__call__(images, train=...)`` gets ``train``
    when it takes one (dropout, BatchNorm); a module without it is called without.
    For BatchNorm statistics over the global batch under ``pmap``, a Linen module
    needs an ``axis_name: str | None = None`` field that it passes to
    ``nn.BatchNorm(axis_name=...)``, as ``jaxtrain.models`` do (``train_step`` sets
    it; on a mesh nothing is needed). ``sample_images`` only provides shapes
    ``[B, H, W, C]``; a batch of one is enough. Pure: jit it, or
    ``jax.eval_shape`` it to get shapes first.
    """
    if not isinstance(model, nn.Module):
        from flax import nnx

        if isinstance(model, nnx.Module):
            from jaxtrain.nnx_bridge import NNXModel

            model = NNXModel(model)
    variables = model.init({"params": rng}, sample_images, **train_kwargs(model, False))
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=model_state,
        opt_state=tx.init(params),
        model=model,
        tx=tx,
        lr_fn=lr_fn,
    )
