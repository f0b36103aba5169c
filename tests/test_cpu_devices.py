"""``--cpu-devices``: how many XLA:CPU devices a run makes (``jaxtrain.cpu_devices``).

The auto rules split only where the figures in ``cpu_devices`` say it pays (a seed
run's seeds, not a single run's batch); auto defers to every setting that fixes the
device count; and a fresh process trains over the cores exactly as one device does
(the CNN's batch split by ``--cpu-devices 2``, an MLP seed run's seeds split by auto).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jaxtrain import cpu_devices
from jaxtrain.config import TrainConfig
from jaxtrain.cpu_devices import use_cpu_devices
from jaxtrain.parallel import ParallelError

ROOT = Path(__file__).resolve().parents[1]


def test_use_cpu_devices_after_jax_started():
    use_cpu_devices(0)  # nothing asked
    use_cpu_devices(len(jax.devices("cpu")))  # already so: nothing to do
    with pytest.raises(ParallelError, match=r"--cpu-devices 3 must be set before JAX starts"):
        use_cpu_devices(3)


def test_auto_seed_cpu_devices_splits_seeds_while_each_device_gets_enough_pixels():
    from jaxtrain.cpu_devices import AUTO_CPU_SEED_SPLIT_MIN_PIXELS, auto_seed_cpu_devices

    assert AUTO_CPU_SEED_SPLIT_MIN_PIXELS == {  # as below
        "mlp": 2**14, "cnn": 2**15, "resnet_tiny": 2**15, "resnet18": 2**15}
    digits = (8, 8)  # 64 pixels: a batch of 64 is 4096 per seed
    assert auto_seed_cpu_devices("mlp", 16, 64, digits, cores=2) == 2  # 8 seeds each: 32k
    assert auto_seed_cpu_devices("mlp", 16, 64, digits, cores=16) == 4  # 4 each: 16k
    assert auto_seed_cpu_devices("mlp", 8, 64, digits, cores=2) == 2
    assert auto_seed_cpu_devices("mlp", 32, 64, digits, cores=16) == 8  # MAX_DEVICES
    assert auto_seed_cpu_devices("mlp", 4, 64, digits, cores=2) == 0  # 8k: as fast as one
    assert auto_seed_cpu_devices("mlp", 4, 128, digits, cores=2) == 2  # 2 x 8192
    assert auto_seed_cpu_devices("mlp", 15, 64, digits, cores=2) == 0  # 2 does not divide 15
    assert auto_seed_cpu_devices("mlp", 15, 66, digits, cores=4) == 3  # 5 x 66 x 64 = 21k
    assert auto_seed_cpu_devices("mlp", 15, 33, digits, cores=4) == 0  # 3: 5 x 33 x 64 = 10k
    assert auto_seed_cpu_devices("mlp", 16, 63, digits, cores=2) == 0  # 2 does not divide 63
    assert auto_seed_cpu_devices("mlp", 16, 64, digits, cores=1) == 0
    mnist = (28, 28)  # a batch of 128 is 100k pixels per seed
    assert auto_seed_cpu_devices("cnn", 2, 128, mnist, cores=2) == 2  # a seed each
    assert auto_seed_cpu_devices("cnn", 4, 128, mnist, cores=8) == 4
    assert auto_seed_cpu_devices("cnn", 2, 32, mnist, cores=2) == 0  # 25k: below the floor
    assert auto_seed_cpu_devices("cnn", 3, 128, mnist, cores=2) == 0  # 2 does not divide 3
    cifar = (32, 32)  # a batch of 32 is 32k pixels per seed
    for model in ("resnet18", "resnet_tiny"):
        assert auto_seed_cpu_devices(model, 2, 32, cifar, cores=2) == 2  # measured: 1.4-1.5x
        assert auto_seed_cpu_devices(model, 4, 128, cifar, cores=8) == 4
        assert auto_seed_cpu_devices(model, 2, 16, cifar, cores=2) == 0  # 16k: below the floor
    assert auto_seed_cpu_devices("resnet18", 16, 32, cifar, cores=1) == 0


def test_resolve_cpu_devices_applies_auto_only_where_the_run_is_free_to_split(monkeypatch):
    """Auto (0) defers to every setting that fixes the device count or the run's shape."""
    monkeypatch.setattr(cpu_devices, "usable_cores", lambda: 4)
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
    base = TrainConfig(model="cnn", dataset="synthetic", batch_size=128)

    def resolve(image_shape=(28, 28, 1), resident=True, **changes):
        return cpu_devices.resolve_cpu_devices(base.replace(**changes), image_shape, resident)

    assert resolve() == 0  # a single run stays on one device (no faster split: fused steps)
    assert resolve(batch_size=256) == 0
    assert resolve(cpu_devices=3) == 3  # the user's count, whatever the model
    assert resolve(model="mlp", cpu_devices=2) == 2
    assert resolve(model="mlp") == 0
    assert resolve((8, 8, 1)) == 0
    seeds = {"model": "mlp", "num_seeds": 8, "batch_size": 64}  # 4 a device: 16k pixels
    assert resolve((8, 8, 1), **seeds) == 2  # its seeds split over the cores
    assert resolve((8, 8, 1), **{**seeds, "num_seeds": 16}) == 4
    assert resolve((8, 8, 1), **seeds, parallel="mesh", seed_parallel=True) == 2
    assert resolve((8, 8, 1), **seeds, parallel="pmap") == 0  # seed runs refuse pmap
    assert resolve((8, 8, 1), **{**seeds, "num_seeds": 4}) == 0
    cnn_seeds = {"num_seeds": 2}  # CNN seeds: split by seed, a seed per core
    assert resolve(**cnn_seeds) == 2
    assert resolve(num_seeds=2, batch_size=32) == 0  # 25k pixels per device
    for changes in ({"parallel": "none"}, {"devices": 2}, {"parallel": "pmap"},
                    {"coordinator_address": "127.0.0.1:1234",
                     "num_processes": 2, "process_id": 0}):
        assert resolve(**cnn_seeds, **changes) == 0, changes
    assert resolve(**cnn_seeds, steps_per_call=1) == 2
    assert resolve(**cnn_seeds, steps_per_call=4) == 2  # fused calls with resident data ...
    assert resolve(**cnn_seeds, steps_per_call=4, resident=False) == 0  # ... not host batches
    assert resolve(**cnn_seeds, resident=False) == 2  # single steps split either way
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")  # a cluster's processes: never split
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node1")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    assert resolve(**cnn_seeds) == 0
    for name in ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_STEP_NODELIST", "SLURM_JOB_ID"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "4")
    assert resolve(**cnn_seeds) == 0
    monkeypatch.delenv("JAX_NUM_CPU_DEVICES")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert resolve(**cnn_seeds) == 0


def _run_in_fresh_process(module: str, workdir, flags: list[str]) -> tuple[dict, dict]:
    """``python -m experiments.<module>`` in a fresh process whose device count nothing
    but ``flags`` fixes (``--cpu-devices`` decides); its ``summary.json`` and
    ``config.json``."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    env.update({"XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})
    proc = subprocess.run(
        [sys.executable, "-m", f"experiments.{module}", "--workdir", str(workdir), *flags],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    return (json.loads((workdir / "summary.json").read_text()),
            json.loads((workdir / "config.json").read_text()))


def test_cpu_devices_trains_the_cnn_over_the_cores_like_one_device(tmp_path):
    """A fresh process with ``--cpu-devices 2`` (auto leaves a single run on one device)
    splits the MNIST-shape CNN at batch 128 over 2 CPU devices (``--parallel auto`` =
    mesh) and fuses its steps, records the count, and trains as one device does."""
    from jaxtrain.loop import train_and_evaluate

    flags = ["--dataset", "synthetic", "--synthetic-shape", "28,28,1", "--synthetic-size", "640",
             "--epochs", "1", "--eval-batch-size", "128", "--progress", "none",
             "--compilation-cache", "", "--cpu-devices", "2"]
    auto, manifest = _run_in_fresh_process("mnist_cnn", tmp_path / "auto", flags)
    assert (auto["num_devices"], auto["strategy"]) == (2, "mesh")
    assert auto["steps"] == 3 and auto["steps_per_call"] == 3  # and fuses them: one call
    assert (manifest["cpu_devices"], manifest["config"]["cpu_devices"]) == (2, 2)

    from experiments.mnist_cnn import DEFAULTS

    one = train_and_evaluate(
        DEFAULTS.replace(dataset="synthetic", synthetic_shape=(28, 28, 1), synthetic_size=640,
                         epochs=1, eval_batch_size=128, progress="none", compilation_cache="",
                         parallel="none"), str(tmp_path / "one"))
    assert one["num_devices"] == 1 and one["steps"] == auto["steps"] > 0
    assert auto["test_accuracy"] == one["test_accuracy"]
    assert auto["test_loss"] == pytest.approx(one["test_loss"], rel=1e-4)


def test_auto_cpu_devices_trains_mlp_seeds_seed_parallel_like_one_device(tmp_path):
    """A seed run in a fresh process with ``--cpu-devices`` auto splits its seeds over
    the cores, one block per device (``seed_parallel`` recorded), and each seed trains
    as on one device."""
    from jaxtrain.cpu_devices import auto_seed_cpu_devices, usable_cores
    from jaxtrain.loop import train_and_evaluate

    want = auto_seed_cpu_devices("mlp", 4, 128, (8, 8), usable_cores())
    if want < 2:
        pytest.skip(f"auto makes no split on {usable_cores()} core(s)")
    flags = ["--num-seeds", "4", "--batch-size", "128", "--epochs", "1", "--no-robustness",
             "--progress", "none", "--compilation-cache", ""]
    auto, manifest = _run_in_fresh_process("digits_seeds", tmp_path / "auto", flags)
    assert (auto["num_devices"], auto["strategy"], auto["seed_parallel"]) == (want, "mesh", True)
    assert (manifest["cpu_devices"], manifest["config"]["cpu_devices"]) == (want, 0)
    assert manifest["config"]["seed_parallel"] is True

    from experiments.digits_seeds import DEFAULTS

    one = train_and_evaluate(
        DEFAULTS.replace(num_seeds=4, batch_size=128, epochs=1, progress="none",
                         compilation_cache="", parallel="none"), str(tmp_path / "one"))
    assert one["num_devices"] == 1 and one["seed_parallel"] is False
    assert auto["test_accuracy_per_seed"] == one["test_accuracy_per_seed"]
    assert auto["test_loss_per_seed"] == pytest.approx(one["test_loss_per_seed"], rel=1e-4)
