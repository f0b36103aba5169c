"""``--on-nonfinite``: what the loop does when a step's loss or gradient is not finite.

The step itself skips such an update (``train_step(skip_nonfinite=True)``); the
loop learns of it at the next flush of its ``TrainWindow`` and then raises
(``NonFiniteError``, naming the first bad parameter or gradient), skips, or rolls
back to the last checkpoint, stopping after ``--max-skipped`` in a row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain import data as data_lib
from jaxtrain.checkpoint import first_nonfinite
from jaxtrain.fusing import unstack_steps
from jaxtrain.program import step_key
from jaxtrain.state import TrainState, train_kwargs
from jaxtrain.steps import cross_entropy


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient or state (see ``--on-nonfinite``)."""

    exit_status = 1  # the CLI reports it in one line


def diagnose_nonfinite(state: TrainState, batch: dict[str, np.ndarray], rng: jax.Array) -> str:
    """Where a non-finite step comes from, recomputed on the host after detection (off
    the hot path): the first non-finite parameter, else the first non-finite gradient
    leaf of the loss on ``batch``."""
    bad = first_nonfinite(state.params)
    if bad is not None:
        return f"first non-finite parameter: {bad}"

    def loss_fn(params):
        logits, _ = state.model.apply(
            {"params": params, **state.model_state}, batch["image"],
            **train_kwargs(state.model, True), rngs={"dropout": rng}, mutable=list(state.model_state),
        )
        return jnp.mean(cross_entropy(logits, batch["label"]))

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(state.params)
    bad = first_nonfinite(jax.device_get(grads))
    if bad is not None:
        return f"first non-finite gradient: {bad}"
    return f"loss {float(loss)}, every gradient finite on recomputation"


def nonfinite_message(state: TrainState, train: data_lib.Split, seeds: Sequence[int],
                      batch_size: int, bad: int, metrics: dict[str, Any]) -> str:
    """One line for policy ``raise``: the step ``bad`` (1-based, as in metrics.jsonl),
    the seed (a seed run's first bad one) and the first non-finite leaf, recomputed on
    its batch. ``state``: host state after that step, stacked ``[S, ...]`` for seeds."""
    seeded = len(seeds) > 1
    i = int(np.argmax(np.reshape(metrics["nonfinite"], -1))) if seeded else 0
    if seeded:
        state = jax.tree.map(lambda x: x[i], state)
    idx = data_lib.batch_indices(seeds[i], bad - 1, len(train["label"]), batch_size)
    # the step's dropout key, as program.make_update derives it
    rng = jax.random.split(jax.random.fold_in(step_key(seeds[i]), int(state.step)))[1]
    where = diagnose_nonfinite(state, data_lib.take(train, idx), rng)
    loss = float(np.reshape(metrics["loss"], -1)[i])
    seed = f" (seed {seeds[i]})" if seeded else ""
    return (f"non-finite loss or gradient at step {bad}{seed}: loss={loss}, {where}; "
            "try a lower --lr, --clip-norm, or --on-nonfinite skip/rollback")


class TrainWindow:
    """The train metrics of the compiled calls since the last flush, left on the devices
    (a flush is the loop's one host sync, at log, eval and checkpoint steps), and
    ``--on-nonfinite``'s count of consecutive non-finite steps (kept in checkpoints).

    A checkpoint taken between flushes (at preemption) keeps the window's steps
    (``pending``); a run resumed from it starts its window with them (``restored``), so
    its next train record averages the same steps as a run never stopped."""

    def __init__(self, policy: str, max_skipped: int, get: Callable[[Any], Any], *,
                 seeded: bool, skipped_in_a_row: int = 0,
                 restored: Sequence[Mapping[str, Any]] = ()) -> None:
        self.policy, self.max_skipped, self.get, self.seeded = policy, max_skipped, get, seeded
        self.skipped_in_a_row = skipped_in_a_row
        self._calls: list[tuple[int, Any]] = []  # (steps, metrics) per call
        self._host: list[dict[str, Any]] = [  # steps already on the host, before _calls
            {k: np.asarray(v["value"], v["dtype"]) for k, v in m.items()} for m in restored]

    def add(self, n: int, metrics: Any) -> None:
        """The device metrics of one call of ``n`` steps."""
        self._calls.append((n, metrics))

    def __bool__(self) -> bool:
        return bool(self._calls or self._host)

    def _to_host(self) -> list[dict[str, Any]]:
        self._host += [h for n, m in self._calls for h in unstack_steps(self.get(m), self.seeded, n)]
        self._calls.clear()
        return self._host

    def pending(self) -> list[dict[str, Any]]:
        """The steps not flushed yet, one JSON-able dict per step (exact: the values with
        their dtype), for a checkpoint's metadata; ``restored=`` takes them back."""
        return [{k: {"value": np.asarray(v).tolist(), "dtype": np.asarray(v).dtype.name}
                 for k, v in m.items()} for m in self._to_host()]

    def flush(self, step: int, describe: Callable[[int, dict[str, Any]], str]
              ) -> tuple[dict[str, Any], int, int | None]:
        """Brings the window to the host and applies ``--on-nonfinite``: ``raise`` raises
        ``NonFiniteError(describe(bad, metrics))``; skip and rollback raise after
        ``max_skipped`` consecutive non-finite steps (a rollback does not reset the count).

        Returns the mean train metrics over its finite steps (all of them when none is;
        ``[S]`` values for seeds) with ``skipped``, its step count, and the first
        non-finite step, if any (the window ends at data position ``step``)."""
        host, self._host = self._to_host(), []
        first_bad = None
        for i, m in enumerate(host):
            if np.any(m["nonfinite"]):
                bad = step - len(host) + i + 1
                first_bad = first_bad or bad
                if self.policy == "raise":
                    raise NonFiniteError(describe(bad, m))
                self.skipped_in_a_row += 1
                if self.skipped_in_a_row >= self.max_skipped:
                    raise NonFiniteError(
                        f"{self.skipped_in_a_row} consecutive non-finite steps up to step {bad} "
                        f"(--on-nonfinite {self.policy}); stopping (--max-skipped)"
                    )
            else:
                self.skipped_in_a_row = 0
        finite = [m for m in host if not np.any(m["nonfinite"])] or host
        mean = {k: np.mean([m[k] for m in finite], axis=0)
                for k in ("loss", "accuracy", "grad_norm", "lr")}
        mean["skipped"] = float(sum(np.sum(m["nonfinite"]) for m in host))
        return mean, len(host), first_bad
