"""The training state pytree and its constructor."""

from __future__ import annotations

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
            {"params": self.params, **self.model_state}, images, train=train, **kwargs
        )


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
    initialized from ``rng``). ``sample_images`` only provides shapes
    ``[B, H, W, C]``; a batch of one is enough. Pure: jit it, or
    ``jax.eval_shape`` it to get shapes first.
    """
    if not isinstance(model, nn.Module):
        from flax import nnx

        if isinstance(model, nnx.Module):
            from jaxtrain.nnx_bridge import NNXModel

            model = NNXModel(model)
    variables = model.init({"params": rng}, sample_images, train=False)
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
