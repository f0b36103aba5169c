"""The robustness suite on a trained run: load it, evaluate, write ``workdir/robustness/``.

The edge of the robustness package (files and progress lines live here, as in
``jaxtrain.loop``): ``run_robustness(workdir)`` rebuilds the model from the
run's ``config.json`` and checkpoint, evaluates ``suite.evaluate_suite`` on the
test split (all seeds of a seed run in one program), optionally the published
``cifar10_corrupted`` images, and writes ``report.json``, ``report.md`` and PNG
plots. ``train_then_robustness`` trains first (the ``--robustness`` flag of the
experiments).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Literal

import numpy as np

from jaxtrain.config import ConfigError, TrainConfig, check_types
from jaxtrain.robustness.perturbations import CORRUPTIONS, SEVERITIES
from jaxtrain.robustness.suite import (
    ATTACK_METHODS,
    FLIP_NOISES,
    RobustnessError,
    SuiteSpec,
    attack_preset_for,
    attack_settings,
    corruption_preset_for,
)
from jaxtrain.writers import write_json

REPORT_DIR = "robustness"


def _names(text: str, valid: tuple[str, ...], flag: str, *, all_ok: bool = True) -> tuple[str, ...]:
    """A comma-separated list of names; ``all`` is every one of ``valid``, ``none`` or ``""`` none."""
    text = text.strip()
    if all_ok and text == "all":
        return valid
    if text in ("", "none"):
        return ()
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    for n in names:
        if n not in valid:
            raise ConfigError(f"{flag}: unknown name {n!r}; choose from {', '.join(valid)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{flag} lists a name twice: {text}")
    return names


@dataclasses.dataclass(frozen=True)
class RobustnessConfig:
    """The robustness suite on a trained run (reads WORKDIR/config.json and its checkpoint;
    writes WORKDIR/robustness/)."""

    workdir: str = ""
    # a report.json of another run: CE / mCE and relative CE / mCE against it
    baseline: str = ""
    corruptions: str = "all"  # comma-separated names, or all
    severities: tuple[int, ...] = SEVERITIES
    num_keys: int = 1  # noise draws per (corruption, severity); random corruptions only
    preset: Literal["auto", "cifar", "imagenet"] = "auto"  # auto: imagenet from 64 px up
    attacks: str = "fgsm,pgd_linf,pgd_l2"  # comma-separated, or none
    attack_preset: Literal["auto", "digits", "mnist", "cifar", "imagenet"] = "auto"
    eps: tuple[float, ...] = ()  # Linf budgets of fgsm / pgd_linf (default: the attack preset's)
    eps_l2: tuple[float, ...] = ()  # L2 budgets of pgd_l2 (default: the attack preset's)
    attack_steps: int = 0  # PGD steps (0: the attack preset's)
    flip_noises: str = "gaussian_noise"  # noise sequences for the flip probability, or none
    flip_frames: int = 10
    # also evaluate on the published TFDS cifar10_corrupted (needs it prepared, see --data-dir)
    cifar10_corrupted: bool = False
    data_dir: str | None = None  # default: the run's --data-dir
    max_examples: int = 0  # evaluate the first N test examples (0: all)
    step: int = -1  # checkpoint step (-1: the latest)
    seed: int = 0  # key of every noise draw and random start
    chunk_size: int = 0  # examples per chunk (0: from --memory-budget-mb)
    memory_budget_mb: int = 0  # 0: 40% of accelerator memory, 1024 on CPU
    # auto: on for CPU and small test splits (evaluator.wants_fast_compile); off for
    # CIFAR-10-C's published images (tfds_c)
    fast_compile: Literal["auto", "on", "off"] = "auto"
    parallel: Literal["auto", "none", "mesh"] = "auto"
    devices: int = 0
    plots: bool = True
    progress: Literal["auto", "log", "none"] = "auto"
    compilation_cache: str = "~/.cache/jaxtrain/xla"
    deterministic: bool = False

    def validate(self) -> RobustnessConfig:
        check_types(self)
        if not self.workdir.strip():
            raise ConfigError("--workdir is required: the folder of a trained run")
        _names(self.corruptions, CORRUPTIONS, "--corruptions")
        _names(self.attacks, ATTACK_METHODS, "--attacks", all_ok=False)
        _names(self.flip_noises, FLIP_NOISES, "--flip-noises", all_ok=False)
        if not self.severities or any(s not in SEVERITIES for s in self.severities):
            raise ConfigError(f"--severities must be values in 1..5, got {list(self.severities)}")
        if len(set(self.severities)) != len(self.severities):
            raise ConfigError(f"--severities lists a severity twice: {list(self.severities)}")
        for flag, values in (("--eps", self.eps), ("--eps-l2", self.eps_l2)):
            if any(not (np.isfinite(e) and e > 0) for e in values):
                raise ConfigError(f"{flag} values must be finite and > 0, got {list(values)}")
        if any(e > 1 for e in self.eps):
            raise ConfigError(f"--eps is a Linf budget on pixels in [0, 1]; got {list(self.eps)}")
        for name in ("num_keys", "flip_frames"):
            if getattr(self, name) < (2 if name == "flip_frames" else 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be >= "
                                  f"{2 if name == 'flip_frames' else 1}, got {getattr(self, name)}")
        for name in ("attack_steps", "max_examples", "chunk_size", "memory_budget_mb", "devices"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.parallel == "none" and self.devices > 1:
            raise ConfigError(f"--parallel none runs on one device, but --devices {self.devices} "
                              "asks for more (use --parallel auto or mesh)")
        if self.step < -1:
            raise ConfigError(f"--step must be a checkpoint step or -1 (latest), got {self.step}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"--seed must be in [0, 2**32), got {self.seed}")
        if self.baseline and not os.path.isfile(self.baseline):
            raise ConfigError(f"--baseline {self.baseline} is not a file (pass a report.json)")
        return self

    def replace(self, **changes: Any) -> RobustnessConfig:
        return dataclasses.replace(self, **changes)

    def suite_spec(self, dataset: str, image_shape: tuple[int, ...]) -> SuiteSpec:
        """The ``SuiteSpec`` for a run on ``dataset`` (presets resolved from it)."""
        preset = corruption_preset_for(image_shape) if self.preset == "auto" else self.preset
        attack_preset = (attack_preset_for(dataset, image_shape)
                         if self.attack_preset == "auto" else self.attack_preset)
        attacks = attack_settings(_names(self.attacks, ATTACK_METHODS, "--attacks", all_ok=False),
                                  attack_preset, linf_eps=self.eps, l2_eps=self.eps_l2,
                                  steps=self.attack_steps)
        return SuiteSpec(
            corruptions=_names(self.corruptions, CORRUPTIONS, "--corruptions"),
            severities=tuple(self.severities), num_keys=self.num_keys, preset=preset,
            attacks=attacks,
            flip_noises=_names(self.flip_noises, FLIP_NOISES, "--flip-noises", all_ok=False),
            flip_frames=self.flip_frames, seed=self.seed, chunk_size=self.chunk_size,
            memory_budget_bytes=self.memory_budget_mb << 20,
        ).validate()


# ----------------------------------------------------------------------------- a trained run


@dataclasses.dataclass
class LoadedRun:
    """A trained run rebuilt from its workdir: model, variables ``[S, ...]``, test split."""

    workdir: str
    config: dict[str, Any]
    data: dict[str, Any]
    model: Any
    variables: Any  # host arrays, leading seed axis (size 1 for a single run)
    seeds: list[int]
    seeded: bool  # the checkpoint itself has a seed axis
    step: int | None
    test: dict[str, np.ndarray]

    def apply_fn(self, variables: Any, images: Any) -> Any:
        return self.model.apply(variables, images, train=False)

    def describe(self) -> dict[str, Any]:
        return {
            "workdir": self.workdir,
            "model": self.config.get("model"),
            "dataset": self.config.get("dataset"),
            "image_shape": list(self.data.get("image_shape", [])),
            "num_classes": self.data.get("num_classes"),
            "dtype": self.config.get("dtype"),
            "num_seeds": len(self.seeds),
            "seeds": self.seeds,
            "checkpoint_step": self.step,
            "test_examples": len(self.test["label"]),
            "epochs": self.config.get("epochs"),
        }


def load_run(workdir: str, *, step: int | None = None, data_dir: str | None = None,
             max_examples: int = 0) -> LoadedRun:
    """Rebuilds the model of a run, its checkpointed variables and its test split.

    Raises ``RobustnessError`` (one line) for a folder that is not a trained run."""
    import jax
    import jax.numpy as jnp

    from jaxtrain.checkpoint import Checkpointer, checkpoint_dir, load_variables
    from jaxtrain.data import load_dataset
    from jaxtrain.models import create_model

    workdir = os.path.abspath(os.path.expanduser(workdir))
    if not os.path.isdir(workdir):
        raise RobustnessError(f"--workdir {workdir} does not exist")
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise RobustnessError(f"--workdir {workdir} has no config.json: not a jaxtrain run")
    try:
        with open(path) as f:
            manifest = json.load(f)
        cfg, data = dict(manifest["config"]), dict(manifest.get("data") or {})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RobustnessError(f"{path} cannot be read as a run config ({type(e).__name__})") from None
    steps = []
    if os.path.isdir(checkpoint_dir(workdir)):
        reader = Checkpointer(workdir, read_only=True)
        try:
            steps = reader.all_steps()
        finally:
            reader.close()
    if not steps:
        raise RobustnessError(f"--workdir {workdir} holds no checkpoint (train it first, e.g. "
                              f"python -m experiments.digits_mlp --workdir {workdir})")
    if step is not None and step not in steps:
        raise RobustnessError(f"--step {step}: {workdir} has checkpoints at steps {steps}")
    variables = load_variables(workdir, step)
    num_seeds = int(cfg.get("num_seeds", 1))
    seeds = [int(cfg.get("seed", 0)) + i for i in range(num_seeds)]
    seeded = num_seeds > 1
    if not seeded:
        variables = jax.tree.map(lambda x: np.asarray(x)[None], variables)

    dataset = load_dataset(
        cfg.get("dataset", "digits"), val_fraction=cfg.get("val_fraction", 0.1),
        data_dir=data_dir if data_dir is not None else cfg.get("data_dir"),
        synthetic_size=cfg.get("synthetic_size", 4096),
        synthetic_shape=tuple(cfg.get("synthetic_shape", (28, 28, 1))),
        synthetic_classes=cfg.get("synthetic_classes", 10),
    )
    test = dict(dataset.test)
    if max_examples:
        test = {k: v[:max_examples] for k, v in test.items()}
    data = {"num_classes": dataset.num_classes, "image_shape": list(dataset.image_shape),
            "mean": list(dataset.mean), "std": list(dataset.std), **data}
    model = create_model(
        cfg.get("model", "mlp"), int(data["num_classes"]), mean=data["mean"], std=data["std"],
        dropout=cfg.get("dropout", 0.0),
        dtype=jnp.bfloat16 if cfg.get("dtype") == "bfloat16" else jnp.float32,
    )
    _check_fits(model, variables, tuple(data["image_shape"]), workdir)
    return LoadedRun(workdir, cfg, data, model, variables, seeds, seeded,
                     steps[-1] if step is None else step, test)


def _check_fits(model: Any, variables_S: Any, image_shape: tuple[int, ...], workdir: str) -> None:
    """``RobustnessError`` naming the first leaf whose shape differs from the model's."""
    import jax
    import jax.numpy as jnp

    from jaxtrain.checkpoint import leaf_paths

    expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                 jnp.zeros((1, *image_shape)), train=False))
    have = dict(leaf_paths(variables_S))
    for path, leaf in leaf_paths(expected):
        got = have.pop(path, None)
        if got is None or tuple(np.shape(got)[1:]) != tuple(leaf.shape):
            shape = None if got is None else list(np.shape(got)[1:])
            raise RobustnessError(f"the checkpoint in {workdir} does not fit its model "
                                  f"({path}: {shape} saved, {list(leaf.shape)} expected)")
    if have:
        raise RobustnessError(f"the checkpoint in {workdir} has {next(iter(have))}, "
                              "which its model does not")


# ----------------------------------------------------------------------------- the edge


def _logger(mode: str):
    if mode == "none":
        return None
    return lambda line: print(line, flush=True)


def run_robustness(workdir: str, config: RobustnessConfig | None = None,
                   **overrides: Any) -> dict[str, Any]:
    """Evaluates the trained run in ``workdir`` and writes ``workdir/robustness/``
    (``report.json``, ``report.md``, plots). ``config`` defaults to ``RobustnessConfig()``;
    ``overrides`` replace its fields. Returns the headline figures and file paths."""
    from jaxtrain.config import check_writable_dir
    from jaxtrain.robustness import report as report_lib
    from jaxtrain.workdir_lock import hold_report

    t_start = time.perf_counter()
    config = (config or RobustnessConfig()).replace(workdir=workdir, **overrides).validate()
    root = os.path.abspath(os.path.expanduser(workdir))
    out_dir = os.path.join(root, REPORT_DIR)
    check_writable_dir(out_dir, "--workdir")
    baseline = report_lib.load_baseline(config.baseline) if config.baseline else None
    run = load_run(workdir, step=None if config.step < 0 else config.step,
                   data_dir=config.data_dir, max_examples=config.max_examples)
    with hold_report(root, out_dir):  # one suite at a time writes the report
        return _evaluate(config, run, baseline, out_dir, t_start)


def _evaluate(config: RobustnessConfig, run: LoadedRun, baseline: dict[str, Any] | None,
              out_dir: str, t_start: float) -> dict[str, Any]:
    """``run_robustness``'s work on the loaded ``run``, once it holds the report folder."""
    import jax

    from jaxtrain.parallel import create_strategy
    from jaxtrain.program import setup_compilation_cache
    from jaxtrain.robustness import report as report_lib

    spec = config.suite_spec(run.config.get("dataset", ""), tuple(run.data["image_shape"]))
    if config.cifar10_corrupted and (tuple(run.data["image_shape"]) != (32, 32, 3)
                                     or run.data["num_classes"] != 10):
        raise RobustnessError(
            f"--cifar10-corrupted needs a model of 32x32x3 images and 10 classes; this run is "
            f"{run.config.get('dataset')} {run.data['image_shape']} with "
            f"{run.data['num_classes']} classes")
    data_dir = config.data_dir if config.data_dir is not None else run.config.get("data_dir")
    if config.cifar10_corrupted:  # prepared? said now, not after the in-memory suite
        from jaxtrain.robustness.tfds_c import check_prepared

        check_prepared(severities=spec.severities, data_dir=data_dir)
    setup_compilation_cache(config.compilation_cache)
    strategy = create_strategy(config.parallel, config.devices)
    log = _logger(config.progress) if jax.process_index() == 0 else None
    fast = None if config.fast_compile == "auto" else config.fast_compile == "on"
    if log is not None:
        log(f"robustness: {run.config.get('model')} on {run.config.get('dataset')}, "
            f"{len(run.seeds)} seed(s), {len(run.test['label'])} test examples, "
            f"{strategy.num_devices} device(s)")

    from jaxtrain.robustness.suite import evaluate_suite

    result = evaluate_suite(run.apply_fn, run.variables, run.test, spec, strategy=strategy,
                            log=log, fast_compile=fast)
    published = None
    if config.cifar10_corrupted:
        from jaxtrain.robustness.tfds_c import evaluate_cifar10_corrupted

        published = evaluate_cifar10_corrupted(
            run.apply_fn, run.variables, severities=spec.severities, data_dir=data_dir,
            max_examples=config.max_examples, strategy=strategy, chunk_size=config.chunk_size,
            memory_budget_bytes=spec.memory_budget_bytes, fast_compile=fast, log=log)
    device = {"strategy": strategy.kind, "num_devices": strategy.num_devices,
              "platform": strategy.devices[0].platform,
              "device_kind": strategy.devices[0].device_kind}
    report = report_lib.build_report(
        result, run=run.describe(), baseline=baseline, baseline_path=config.baseline,
        cifar10_corrupted=published, devices=device,
        image_channels=int(run.data["image_shape"][-1]),
        image_size=int(max(run.data["image_shape"][:2])))
    report["wall_seconds"] = time.perf_counter() - t_start
    paths: dict[str, str] = {}
    if jax.process_index() == 0:
        paths = report_lib.write_report(report, out_dir, plots=config.plots)
        if log is not None:
            log(f"robustness: report in {paths['report.md']} "
                f"({report['wall_seconds']:.1f} s)")
    return {**report_lib.headline(report), "files": paths}


# What ``train_then_robustness`` evaluates (the run's devices, data dir and progress mode
# are taken from its training config).
TRAIN_SUITE = RobustnessConfig()


def train_then_robustness(config: TrainConfig) -> dict[str, Any]:
    """``train_and_evaluate(config)``, then ``run_robustness(config.workdir)`` if asked for
    (not after ``--dry-run``, which trains nothing).

    Returns the training summary, with the robustness headline figures under
    ``"robustness"`` (also added to ``summary.json``)."""
    from jaxtrain.loop import train_and_evaluate
    from jaxtrain.workdir_lock import keep_held

    with keep_held(config.workdir):  # the workdir lock training takes lasts through the suite
        summary = train_and_evaluate(config)
        if getattr(config, "robustness", False) and not config.dry_run:
            summary["robustness"] = _suite_after_training(config)
    return summary


def _suite_after_training(config: TrainConfig) -> dict[str, Any]:
    """The robustness suite on the run ``config`` just trained, on its devices, data dir
    and progress mode; adds its headline figures to ``summary.json`` and returns them."""
    import jax

    from jaxtrain.preemption import sigterm_ends_the_process

    parallel = config.parallel if config.parallel in ("auto", "none", "mesh") else "auto"
    progress = "none" if config.progress == "none" else "log"
    sigterm_ends_the_process()  # the suite saves nothing: SIGTERM exits, as on one process
    t0 = time.perf_counter()
    figures = run_robustness(
        config.workdir, TRAIN_SUITE, parallel=parallel, devices=config.devices,
        data_dir=config.data_dir, progress=progress, compilation_cache=config.compilation_cache)
    figures["wall_seconds"] = time.perf_counter() - t0
    path = os.path.join(os.path.abspath(config.workdir), "summary.json")
    if jax.process_index() == 0 and os.path.isfile(path):
        with open(path) as f:
            on_disk = json.load(f)
        on_disk["robustness"] = figures
        write_json(path, on_disk)
    return figures
