"""What the loop compiles and where its inputs go: the initial state, the update
function (augmentation and per-step keys around ``steps.train_step``), the keys, and
the placement of state and batches for one model or a stack of seeds."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain import data as data_lib
from jaxtrain.config import TrainConfig, check_model_input
from jaxtrain.fusing import gather_rows
from jaxtrain.models import create_model
from jaxtrain.optim import create_optimizer, create_schedule
from jaxtrain.parallel import Strategy
from jaxtrain.seeds import SeedPlacement, seed_list, stack
from jaxtrain.state import TrainState, create_train_state
from jaxtrain.steps import train_step


def setup_compilation_cache(path: str) -> None:
    """Persistent XLA cache so a second run of the same program skips compilation.

    Keeps every program, however quick to compile: a 0.5 s floor left the eval step,
    the checkpoint snapshot and the eager key ops (0.1-0.6 s each, more under load)
    compiling again in every run, ~1 s of a warm digits-MLP run's ~4 s; reading one
    back takes a few ms."""
    if not path:
        return
    path = os.path.expanduser(path)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def build_model_and_state(
    config: TrainConfig, dataset: data_lib.Dataset, total_steps: int
) -> TrainState:
    """The initial state (host arrays) for ``config``; a pure function of ``config.seed``.

    With ``config.num_seeds > 1`` every leaf gets a leading seed axis ``[S, ...]``
    (seeds ``seed .. seed + S - 1``, each initialized exactly as its single run)."""
    model = create_model(
        config.model,
        dataset.num_classes,
        mean=dataset.mean,
        std=dataset.std,
        dropout=config.dropout,
        dtype=jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32,
    )
    schedule = create_schedule(
        config.schedule, config.lr, total_steps, warmup_steps=config.warmup_steps
    )
    tx = create_optimizer(
        config.optimizer,
        schedule,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        clip_norm=config.clip_norm or None,
    )
    check_model_input(model, dataset.image_shape, dataset.num_classes, config.model)
    sample = jnp.zeros((1, *dataset.image_shape), jnp.float32)
    init = functools.partial(create_train_state, model, tx, sample_images=sample, lr_fn=schedule)
    if config.num_seeds > 1:
        keys = jnp.stack([init_key(s) for s in seed_list(config.seed, config.num_seeds)])
        state = run_once(jax.vmap(init), keys)
    else:
        state = run_once(init, init_key(config.seed))
    return jax.tree.map(np.asarray, state)


def run_once(fn: Callable[..., Any], *args: Any) -> Any:
    """``jax.jit(fn)(*args)`` for a function called once, such as initialization.

    On CPU it compiles without LLVM optimization: parameter initializers (a
    threefry and an erf_inv per parameter) otherwise compile ~10x slower
    (resnet_tiny 20 s -> 1 s, the digits MLP 4 s -> 1 s) and run only once."""
    lowered = jax.jit(fn).lower(*args)
    fast = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return lowered.compile(fast)(*args)


def init_key(seed: int) -> jax.Array:
    return jax.random.fold_in(jax.random.PRNGKey(seed), 0x1417)


def step_key(seed: int) -> jax.Array:
    """Base key of per-step randomness (dropout, augmentation), folded with the step."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), 0x57E9)


def step_keys(seeds: Sequence[int]) -> np.ndarray:
    """A run's base key (host): ``step_key`` of its one seed, or stacked ``[S, 2]``."""
    return np.asarray(stack([step_key(s) for s in seeds]) if len(seeds) > 1
                      else step_key(seeds[0]))


def make_update(
    config: TrainConfig, *, resident: bool
) -> Callable[..., tuple[TrainState, dict[str, jnp.ndarray]]]:
    """The function compiled for one training step (before parallel compilation).

    ``resident``: ``update(state, data, idx_B, key)`` gathers the batch from
    device-resident ``data``; otherwise ``update(state, batch, key)``.
    """
    step_fn = functools.partial(
        train_step, label_smoothing=config.label_smoothing, skip_nonfinite=True
    )

    def run(state, batch, key, axis_name):
        rng = jax.random.fold_in(key, state.step)
        aug_key, drop_key = jax.random.split(rng)
        if config.crop_padding or config.flip:
            image = data_lib.augment(aug_key, batch["image"], crop_padding=config.crop_padding,
                                     flip=config.flip, axis_name=axis_name)
            batch = {**batch, "image": image}
        return step_fn(state, batch, drop_key, axis_name=axis_name)

    if resident:

        def update(state, data, idx, key, *, axis_name=None):
            return run(state, gather_rows(data, idx), key, axis_name)

    else:

        def update(state, batch, key, *, axis_name=None):
            return run(state, batch, key, axis_name)

    return update


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a run's trees go, and how they come back: ``state`` (the train state and
    keys), ``batch`` (this process's rows of a train batch, or indices ``[B]``/``[S, B]``),
    ``shared`` (what every device reads whole: the device-resident train split),
    ``eval`` (an eval batch), ``get`` (devices -> host numpy). ``seeds`` is set for a
    seed run."""

    state: Callable[[Any], Any]
    batch: Callable[[Any], Any]
    shared: Callable[[Any], Any]
    eval: Callable[[Any], Any]
    get: Callable[[Any], Any]
    seeds: SeedPlacement | None = None

    @property
    def whole(self) -> bool:
        """Each process feeds whole batches (``data.process_rows``): its devices hold
        whole models (``--seed-parallel``)."""
        return self.seeds is not None and self.seeds.seed_parallel

    def indices(self, seeds: Sequence[int], n_train: int, batch_size: int
                ) -> Callable[[int], np.ndarray]:
        """``indices(step)``: this process's batch indices of ``step`` (its rows,
        ``data.process_rows``): ``[B_local]``, or ``[S_local, B_local]`` for the seeds it
        feeds (``SeedPlacement.local_seeds``), as ``batch`` takes them."""
        rows = data_lib.process_rows(batch_size, self.whole)
        if self.seeds is None:
            return lambda step: data_lib.batch_indices(seeds[0], step, n_train, batch_size)[rows]
        local = [seeds[i] for i in self.seeds.local_seeds()]
        return lambda step: np.stack(
            [data_lib.batch_indices(s, step, n_train, batch_size) for s in local])[:, rows]


def _host(tree: Any) -> Any:
    """Batches stay host arrays; the compiled step places them (one CPU device)."""
    return tree


def placement(strategy: Strategy, num_seeds: int = 1, seed_parallel: bool = False) -> Placement:
    """The ``Placement`` of a run of ``num_seeds`` models (stacked when more than one)."""
    if num_seeds > 1:
        seeds = SeedPlacement(strategy, seed_parallel, num_seeds)
        return Placement(
            state=seeds.put_seeds, batch=seeds.put_batch, shared=seeds.put_shared,
            eval=seeds.put_shared if seeds.seed_parallel else strategy.shard, get=seeds.get,
            seeds=seeds)
    batch = strategy.shard
    if strategy.kind == "none" and strategy.devices[0].platform == "cpu":
        # jit copies host arrays into its CPU buffers far cheaper than a device_put
        # per step (~0.4 ms of CPU per step on 2 cores: benchmarks/loop_overhead.py).
        batch = _host
    return Placement(state=strategy.replicate, batch=batch, shared=strategy.replicate,
                     eval=strategy.shard, get=strategy.unreplicate)
