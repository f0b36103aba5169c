"""The pure train and eval steps.

One ``train_step`` serves every strategy: jitted on one device, jitted over a
mesh, pmapped (pass ``axis_name``) and vmapped over a leading seed axis. Bind
fixed options with ``functools.partial``; compile where it is called.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxtrain.state import TrainState, train_kwargs

Batch = dict[str, jnp.ndarray]
Metrics = dict[str, jnp.ndarray]


def cross_entropy(
    logits_BK: jnp.ndarray, labels_B: jnp.ndarray, label_smoothing: float = 0.0
) -> jnp.ndarray:
    """Per-example softmax cross-entropy ``[B]`` with optional label smoothing."""
    num_classes = logits_BK.shape[-1]
    targets = jax.nn.one_hot(labels_B, num_classes)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits_BK, targets)


def _model_for(state: TrainState, axis_name: str | None) -> Any:
    """The model with BatchNorm reducing over ``axis_name`` (pmap), when it has any.

    A model with batch statistics but no ``axis_name`` field to set computes them per
    device under pmap: warned about (once per compile), since the result then depends
    on the device count; a module that names its pmap axis itself is not told apart."""
    if axis_name is None:
        return state.model
    if hasattr(state.model, "axis_name"):
        return state.model.clone(axis_name=axis_name)
    if "batch_stats" in state.model_state:
        warnings.warn(
            f"{type(state.model).__name__} has BatchNorm statistics but no axis_name field: "
            f"under pmap they are computed per device, not over the global batch. Give it "
            f"an `axis_name: str | None = None` field passed to nn.BatchNorm(axis_name=...), "
            f"or train on a mesh", stacklevel=3)
    return state.model


def all_finite(tree: Any) -> jnp.ndarray:
    """True when every leaf of ``tree`` is finite (a scalar bool)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def train_step(
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    *,
    axis_name: str | None = None,
    label_smoothing: float = 0.0,
    loss_fn: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray] | None = None,
    skip_nonfinite: bool = False,
) -> tuple[TrainState, Metrics]:
    """One optimizer step on ``batch = {"image": f32[B, H, W, C], "label": i32[B]}``.

    ``rng`` drives dropout; under ``pmap`` (``axis_name`` set) gradients, metrics
    and BatchNorm statistics are averaged over the axis (so the result equals one
    device seeing the global batch), and ``rng`` is folded with the device index so
    devices draw different masks, unless the model draws its device's rows of the
    global batch's mask itself (``global_batch_dropout``, as ``jaxtrain.models`` do
    with ``models.Dropout``: then dropout equals one device's too). ``loss_fn(logits_BK, labels_B) -> [B]`` replaces
    cross-entropy when given. With ``skip_nonfinite`` a step whose loss or
    gradient is not finite leaves params, model state and optimizer state unchanged
    (``state.step`` still advances, as the data position does; ``metrics["nonfinite"]``
    is 1 for it either way). Returns the new state and scalar metrics ``loss``,
    ``accuracy``, ``grad_norm``, ``lr``, ``nonfinite``.
    """
    if axis_name is not None and not getattr(state.model, "global_batch_dropout", False):
        rng = jax.random.fold_in(rng, lax.axis_index(axis_name))
    model = _model_for(state, axis_name)
    if loss_fn is None:
        loss_fn = lambda logits, labels: cross_entropy(logits, labels, label_smoothing)

    def objective(params):
        variables = {"params": params, **state.model_state}
        logits, new_model_state = model.apply(
            variables, batch["image"], **train_kwargs(model, True), rngs={"dropout": rng},
            mutable=list(state.model_state),
        )
        loss = jnp.mean(loss_fn(logits, batch["label"]))
        return loss, (logits, new_model_state)

    (loss, (logits, new_model_state)), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params
    )
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    if axis_name is not None:
        grads, loss, accuracy = lax.pmean((grads, loss, accuracy), axis_name)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = state.tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        model_state=new_model_state,
        opt_state=new_opt_state,
    )
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite:
        keep = lambda new, old: jnp.where(finite, new, old)
        new_state = new_state.replace(
            params=jax.tree.map(keep, new_state.params, state.params),
            model_state=jax.tree.map(keep, new_state.model_state, state.model_state),
            opt_state=jax.tree.map(keep, new_state.opt_state, state.opt_state),
        )
    lr = state.lr_fn(state.step) if state.lr_fn is not None else jnp.nan
    metrics = {
        "loss": loss,
        "accuracy": accuracy,
        "grad_norm": grad_norm,
        "lr": jnp.asarray(lr, jnp.float32),
        "nonfinite": (~finite).astype(jnp.int32),
    }
    return new_state, metrics


def eval_step(state: TrainState, batch: Batch, *, axis_name: str | None = None) -> Metrics:
    """Sums over one eval batch: ``loss_sum``, ``correct``, ``count``.

    ``batch`` may carry ``mask: f32[B]`` (0 for padding) so a padded last batch
    counts every real example exactly once, whatever the padding rows hold (NaN
    included). Sums (not means) combine exactly across batches and devices (``psum``
    over ``axis_name``).
    """
    logits = state.apply(batch["image"], train=False)
    mask = batch.get("mask", jnp.ones(batch["label"].shape, jnp.float32))
    loss = cross_entropy(logits, batch["label"])
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    sums = {
        "loss_sum": jnp.sum(jnp.where(mask != 0, loss * mask, 0.0)),  # NaN * 0 is NaN
        "correct": jnp.sum(correct * mask),
        "count": jnp.sum(mask),
    }
    if axis_name is not None:
        sums = lax.psum(sums, axis_name)
    return sums
