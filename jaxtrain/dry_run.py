"""``--dry-run``: compiles the train step exactly as the loop would (same strategy,
seeds, data placement) and prints its parameter count, FLOPs per step and memory
per device. Trains nothing and writes nothing."""

from __future__ import annotations

from typing import Any

import jax

from jaxtrain import data as data_lib
from jaxtrain.config import TrainConfig
from jaxtrain.parallel import Strategy
from jaxtrain.profiling import compiled_stats, format_dry_run, model_flops, param_bytes, param_count
from jaxtrain.program import make_update, placement, step_key, step_keys
from jaxtrain.seeds import compile_seeded
from jaxtrain.state import TrainState


def dry_run(
    config: TrainConfig, strategy: Strategy, dataset: data_lib.Dataset, seeds: list[int],
    resident: bool, host_state: TrainState,
) -> dict[str, Any]:
    """Compiles one train step of ``config`` on ``strategy`` from ``host_state`` (seeds
    stacked ``[S, ...]`` when more than one) and prints the report on process 0.
    Returns the figures."""
    update_fn = make_update(config, resident=resident)
    pid = jax.process_index()
    n_train = len(dataset.train["label"])
    seeded = len(seeds) > 1
    place = placement(strategy, len(seeds), config.seed_parallel)
    idx = place.indices(seeds, n_train, config.batch_size)(0)
    key = place.state(step_keys(seeds))
    state = place.state(host_state)
    if resident:
        args = (state, place.shared(dataset.train), place.batch(idx), key)
    else:
        args = (state, place.batch({k: v[idx] for k, v in dataset.train.items()}), key)
    seed_chunk = None
    if seeded:
        compiled, seed_chunk = compile_seeded(
            place.seeds, update_fn, args, num_seeds=len(seeds), seed_chunk=config.seed_chunk,
            resident=resident, log=print if pid == 0 else None)
    else:
        compiled = strategy.compile(update_fn, donate_argnums=(0,)).lower(*args).compile()
    stats = compiled_stats(compiled)
    # one model's step over the global batch, as written (the compiled analysis above
    # counts cuDNN convolutions as 0 on a GPU, and partitioned or vmapped work per device)
    one_state = jax.tree.map(lambda x: x[0], host_state) if seeded else host_state
    gidx = data_lib.batch_indices(seeds[0], 0, n_train, config.batch_size)
    one_data = (dataset.train, gidx) if resident else ({k: v[gidx] for k, v in
                                                        dataset.train.items()},)
    flops_model = model_flops(update_fn, one_state, *one_data, step_key(seeds[0]))
    device = next(d for d in strategy.devices if d.process_index == pid)
    memory = (device.memory_stats() or {}) if hasattr(device, "memory_stats") else {}
    report = {
        "dry_run": True,
        "model": config.model,
        "dataset": dataset.name,
        "image_shape": list(dataset.image_shape),
        "global_batch_size": config.batch_size,
        "num_seeds": len(seeds),
        "seed_chunk": seed_chunk,
        "strategy": strategy.kind,
        "num_devices": strategy.num_devices,
        "device_kind": device.device_kind,
        "params": param_count(host_state.params) // len(seeds),
        "param_bytes": param_bytes(host_state.params) // len(seeds),
        "flops_per_device": stats["flops"],
        "flops_per_step": stats["flops"] * strategy.num_devices,
        "model_flops_per_step": flops_model,
        "device_memory_bytes": memory.get("bytes_limit"),
        **{k: v for k, v in stats.items() if k != "flops"},
    }
    if pid == 0:
        print(format_dry_run(report), flush=True)
    return report
