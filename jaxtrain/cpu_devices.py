"""How many XLA:CPU devices a run makes (``--cpu-devices``; 0 = auto).

XLA:CPU runs much of one device's program on one core, so on a CPU-only host a
step split over one device per core can use them all. Auto splits only where it
was measured faster on these machines (the rules and their figures below): a seed
run's seeds, one block of whole models per device. A single run stays on one
device. The choice is made before JAX starts its backends (``use_cpu_devices``).
"""

from __future__ import annotations

import os

import jax

from jaxtrain import distributed
from jaxtrain.config import TrainConfig
from jaxtrain.parallel import ParallelError, Strategy

# ``--cpu-devices 0`` (auto) leaves a single run (one seed) on one device: splitting its
# batch over the cores was never faster with today's fused steps. Measured on 2 shared
# cores, whole runs through the loop (steady steps/s of 2 devices over one, alternated
# rounds, median (range); benchmarks/results/whole_runs-cpu-split-<case>.json, "-again"
# a longer rerun): the MNIST-shape CNN at batch 128 0.98x (0.70-1.22) and, 6 rounds,
# 1.02x (0.86-1.12), with 870 MiB peak RSS against 730; batch 64 0.95x (0.86-1.33) and
# 0.95x (0.75-1.00); batch 32 0.79x (0.78-0.84); the 8x8 digits CNN at batch 128 1.01x
# (0.89-1.67, load 5.6) and 0.85x (0.78-1.15); the digits MLP 0.66x (0.66-0.71);
# ResNet-18 at CIFAR shape, batch 32, 1.03x (0.82-1.07; 14 single steps a run). Before
# fused steps auto split the CNN while each device got >= 32k input pixels (batch 128:
# 1.17-1.46x, by hand); with fused steps it ran as fast as one device
# (whole_runs-cpu-mnist-cnn-mesh-fused.json, -fused-vs-devices.json), so it stopped.
# Not measured on more than 2 cores: benchmarks/gpu_check.sh's cpu_cores step measures
# the CNN over up to 16 CPU devices where a GPU host is lent.

# Auto never makes more than this many (each holds its own copy of device-resident
# data; more than 2 was never measured faster).
AUTO_CPU_MAX_DEVICES = 8


# ``--cpu-devices 0`` also splits a seed run (``--num-seeds`` > 1) of these models,
# one block of seeds per device (``--seed-parallel``: no all-reduce), while each device
# still gets this many input pixels per step (seeds / n * batch * H * W). Measured on
# 2 cores, whole digits-MLP runs (batch 64, 8x8 images; steady steps/s, 2 devices
# against one, alternated rounds, median): 16 seeds (8 per device, 32k pixels) 1.37x
# (1.35-1.45, 5 rounds; an identical one-device control 1.07x, 0.90-1.21) and 1.25x;
# 8 seeds (16k) 1.18x (1.07-1.23); 4 seeds (8k) 1.01x; 2 seeds 0.93x. Whole MNIST-shape
# CNN runs (batch 128, 100k pixels per seed; 3 rounds): 4 seeds 1.21x (1.10-1.32), 2 seeds
# 1.33x (1.24-1.43), where splitting each seed's batch instead ran 0.55x. The CNN's floor,
# 32k, is the one its single runs were split at before fused steps: not measured lower.
# Whole CIFAR-shape ResNet runs, 2 seeds (a seed per device): resnet_tiny at batch 128
# (131k pixels per device; 3 rounds) 1.79x (1.30-1.99), at batch 32 (32k) 1.53x
# (1.08-1.56); ResNet-18 at batch 32 (32k; 2 rounds) 1.42x (1.39-1.45), where splitting
# one ResNet-18's batch ran 1.03x (above). Their floor is the CNN's, the lowest measured.
AUTO_CPU_SEED_SPLIT_MIN_PIXELS = {"mlp": 2**14, "cnn": 2**15, "resnet_tiny": 2**15,
                                  "resnet18": 2**15}


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's or
    ``taskset``'s share, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def auto_seed_cpu_devices(model: str, num_seeds: int, batch_size: int,
                          image_hw: tuple[int, int], cores: int) -> int:
    """The CPU devices ``--cpu-devices 0`` makes for a seed run, each computing
    ``num_seeds / n`` of the models (``--seed-parallel``); 0 for JAX's default (one).

    For ``AUTO_CPU_SEED_SPLIT_MIN_PIXELS``'s models: the most devices, at most ``cores``
    and ``AUTO_CPU_MAX_DEVICES``, that divide ``num_seeds`` (and ``batch_size``, as the
    loop asks of every run on several devices) and still give each device that many
    input pixels per step; 0 otherwise. Pure: the caller decides whether auto applies at
    all (``resolve_cpu_devices``)."""
    least = AUTO_CPU_SEED_SPLIT_MIN_PIXELS.get(model)
    if least is None:
        return 0
    pixels = batch_size * image_hw[0] * image_hw[1]
    fits = [n for n in range(2, min(cores, AUTO_CPU_MAX_DEVICES) + 1)
            if num_seeds % n == 0 and batch_size % n == 0 and num_seeds // n * pixels >= least]
    return max(fits, default=0)


def local_cpu_device_count() -> int:
    """This process's CPU devices, 0 where JAX runs without its CPU backend
    (``JAX_PLATFORMS=cuda``)."""
    try:
        return len(jax.local_devices(backend="cpu"))
    except RuntimeError:
        return 0


def use_cpu_devices(n: int, *, strict: bool = True) -> None:
    """Makes this host's CPU ``n`` XLA devices (``jax_num_cpu_devices``); 0 does nothing.

    XLA:CPU runs much of one device's program on one core, so on a CPU-only host a
    step over one device per core can use them all (a seed run's blocks of seeds:
    1.2-1.8x on 2 cores; a single run's batch: no faster with fused steps, see above).
    Must run before JAX starts its backends; after, it
    raises ``ParallelError`` unless the CPU already has ``n`` devices, or with
    ``strict=False`` (auto's choice, not the user's) leaves the devices as they are.
    """
    if n <= 0:
        return
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # the backends are up: fine only if they already agree
        have = len(jax.devices("cpu"))
        if have != n and strict:
            raise ParallelError(
                f"--cpu-devices {n} must be set before JAX starts (this process already has "
                f"{have} CPU device(s)); start a new process or set JAX_NUM_CPU_DEVICES={n}"
            ) from None


def resolve_cpu_devices(config: TrainConfig, image_shape: tuple[int, ...],
                        resident: bool = True) -> int:
    """``config.cpu_devices``, or for 0 (auto) the CPU devices to make (0 = JAX's one).

    Auto splits a single-process seed run (``--parallel`` auto or mesh: the seed axis,
    ``seeds_on_auto_devices``) by ``auto_seed_cpu_devices``'s rule, and leaves every
    other run on one device. Not
    when the device count is already fixed (``JAX_NUM_CPU_DEVICES``,
    ``--xla_force_host_platform_device_count`` or ``jax_num_cpu_devices`` set), or an
    explicit ``--steps-per-call`` K > 1 could not run on several (host data:
    ``fusing_needs``). Harmless on a GPU host: the CPU devices it makes go unused."""
    if config.cpu_devices:
        return config.cpu_devices
    try:
        group = distributed.detect(config.coordinator_address, config.num_processes,
                                   config.process_id)
    except distributed.DistributedError:  # distributed.initialize says why
        return 0
    if (group is not None or config.parallel == "none"
            or config.devices or (config.steps_per_call > 1 and not resident)
            or "JAX_NUM_CPU_DEVICES" in os.environ
            or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
            or jax.config.jax_num_cpu_devices != -1):
        return 0
    if config.num_seeds == 1 or config.parallel == "pmap":  # seed runs refuse pmap
        return 0
    return auto_seed_cpu_devices(config.model, config.num_seeds, config.batch_size,
                                 tuple(image_shape[:2]), usable_cores())


def seeds_on_auto_devices(config: TrainConfig, cpu_devices: int, strategy: Strategy) -> bool:
    """Whether a seed run's devices are the CPU devices ``--cpu-devices 0`` made for it,
    which then hold one block of seeds each (``--seed-parallel``): splitting each seed's
    batch over them instead ran the 16-seed digits MLP at 0.54x one device (2 cores)."""
    return (config.num_seeds > 1 and not config.cpu_devices and cpu_devices > 1
            and strategy.kind == "mesh" and strategy.num_devices == cpu_devices
            and strategy.devices[0].platform == "cpu")
