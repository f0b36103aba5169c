"""Optimizer and learning-rate schedule factories, all built from optax pieces."""

from __future__ import annotations

from collections.abc import Sequence

import optax

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "step")


def create_schedule(
    name: str,
    lr: float,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    step_boundaries: Sequence[float] = (0.5, 0.75),
    step_factor: float = 0.1,
) -> optax.Schedule:
    """Learning rate as a function of the step.

    ``constant`` (after an optional linear warmup), ``cosine`` (linear warmup then
    cosine decay to 0 at ``total_steps``), ``step`` (multiply by ``step_factor``
    at each fraction of ``total_steps`` in ``step_boundaries``).
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {list(SCHEDULES)}")
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    if name == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, lr, warmup_steps, max(total_steps, warmup_steps + 1), end_value=0.0
        )
    if name == "step":
        scales: dict[int, float] = {}
        for b in step_boundaries:  # boundaries that round to the same step compound
            at = int(b * total_steps) - warmup_steps
            scales[at] = scales.get(at, 1.0) * step_factor
        main = optax.piecewise_constant_schedule(lr, scales)
    else:
        main = optax.constant_schedule(lr)
    if warmup_steps == 0:
        return main
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup_steps), main], [warmup_steps]
    )


def create_optimizer(
    name: str,
    schedule: optax.Schedule,
    *,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    clip_norm: float | None = None,
    nesterov: bool = False,
) -> optax.GradientTransformation:
    """sgd / momentum / adam / adamw with optional global-norm clipping.

    ``weight_decay`` is decoupled for adamw and added to the gradient (L2) for
    the others, as in their usual definitions.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {list(OPTIMIZERS)}")
    if name == "adamw":
        core = optax.adamw(schedule, weight_decay=weight_decay)
    else:
        if name == "sgd":
            base = optax.sgd(schedule)
        elif name == "momentum":
            base = optax.sgd(schedule, momentum=momentum, nesterov=nesterov)
        else:
            base = optax.adam(schedule)
        core = optax.chain(optax.add_decayed_weights(weight_decay), base) if weight_decay else base
    if clip_norm:
        return optax.chain(optax.clip_by_global_norm(clip_norm), core)
    return core
