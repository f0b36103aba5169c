"""Typed run configuration and the command line derived from it.

Every field of ``TrainConfig`` (or a subclass) is a flag: ``batch_size`` is
``--batch-size``. ``--help`` lists each with its default. Values are checked by
``validate()`` before anything is compiled or written.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import os
import re
import tempfile
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal


class ConfigError(ValueError):
    """A config value that cannot be used (message is one line, names the flag)."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Configuration of one training run (``--batch-size`` is always the global batch)."""

    # data
    dataset: str = "digits"
    data_dir: str | None = None
    val_fraction: float = 0.1
    synthetic_size: int = 4096
    synthetic_shape: tuple[int, ...] = (28, 28, 1)
    synthetic_classes: int = 10
    data_placement: Literal["auto", "device", "host"] = "auto"
    # model
    model: str = "mlp"
    dropout: float = 0.0
    dtype: Literal["float32", "bfloat16"] = "float32"
    # optimization
    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int = 512
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    clip_norm: float = 0.0
    label_smoothing: float = 0.0
    crop_padding: int = 0
    flip: bool = False
    seed: int = 0
    num_seeds: int = 1
    seed_parallel: bool = False
    # seeds each device computes at a time (lax.map chunks); 0 = all that fit in memory
    seed_chunk: int = 0
    # loop
    workdir: str = "runs/default"
    eval_every: int = 0
    log_every: int = 50
    # fuse up to this many training steps into one compiled call (a loop); 1 = off; 0 = auto
    # (fusing.auto_steps_per_call: fused where it was measured faster). One seed; one device
    # or a mesh with device-resident data (fusing.fusing_needs).
    steps_per_call: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    # also keep the best checkpoint by this validation metric ("" = latest only);
    # with it set, a checkpoint is also saved after every validation
    best_metric: Literal["val_accuracy", "val_loss", ""] = "val_accuracy"
    best_mode: Literal["auto", "max", "min"] = "auto"  # auto: min for a loss, else max
    resume: Literal["auto", "never", "must"] = "auto"
    on_nonfinite: Literal["raise", "skip", "rollback"] = "raise"
    max_skipped: int = 10
    progress: Literal["auto", "bar", "log", "none"] = "auto"
    compilation_cache: str = "~/.cache/jaxtrain/xla"
    # devices and hosts
    parallel: Literal["auto", "none", "pmap", "mesh"] = "auto"
    devices: int = 0
    # make this host's CPU this many XLA devices; 0 = auto (cpu_devices.resolve_cpu_devices:
    # one per core for a seed run with enough work per core (seed-parallel), else JAX's one)
    cpu_devices: int = 0
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    # seconds a process of a multi-process run may go unheard (its host down or cut off,
    # the process frozen) before the others end in one line (jaxtrain.peers); 0 = only a
    # process's end counts, and a silent one is left to JAX's heartbeats (100 s)
    peer_timeout: float = 30.0
    # GPU: deterministic XLA ops and full-precision matmuls (see docs/BAD_INPUTS.md)
    deterministic: bool = False
    # outputs and tools (none changes what a run computes)
    tensorboard: bool = True
    wandb_project: str = ""
    mlflow_experiment: str = ""
    profile_steps: str = ""
    dry_run: bool = False

    # Fields that do not change what a run computes; a resumed run may differ in them.
    RUNTIME_FIELDS: typing.ClassVar[frozenset[str]] = frozenset(
        {
            "workdir", "resume", "progress", "log_every", "compilation_cache", "parallel",
            "devices", "cpu_devices", "coordinator_address", "num_processes", "process_id", "data_dir",
            "peer_timeout", "checkpoint_every", "keep_checkpoints", "data_placement", "eval_batch_size", "seed_parallel",
            "seed_chunk",
            "deterministic", "best_metric", "best_mode", "on_nonfinite", "max_skipped",
            "tensorboard", "wandb_project", "mlflow_experiment", "profile_steps", "dry_run",
            "steps_per_call",
            "robustness",  # the experiments' --robustness: an evaluation after training
        }
    )

    # Fields that may differ between the processes of one multi-process run (where each
    # finds its data and cache, how it shows progress); every other one must be equal.
    PROCESS_FIELDS: typing.ClassVar[frozenset[str]] = frozenset(
        {"process_id", "coordinator_address", "data_dir", "compilation_cache", "progress"}
    )

    def validate(self) -> TrainConfig:
        """Raises ``ConfigError`` on the first field of the wrong type or out of range;
        returns self.

        Checks the config alone (no files, devices or data): ``check_paths`` and
        the loop's checks after loading data cover the rest, all before anything
        is compiled or written.
        """
        from jaxtrain.models import MODELS
        from jaxtrain.optim import OPTIMIZERS, SCHEDULES

        check_types(self)
        positive = ("epochs", "batch_size", "num_seeds", "eval_batch_size", "synthetic_size",
                    "log_every", "max_skipped", "keep_checkpoints")
        non_negative = ("eval_every", "checkpoint_every", "warmup_steps", "crop_padding", "seed_chunk",
                        "steps_per_call", "devices", "cpu_devices", "weight_decay", "clip_norm",
                        "peer_timeout")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{_flag(name)} must be > 0, got {getattr(self, name)}")
        for name in non_negative:
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                finite = "finite and " if isinstance(value, float) else ""
                raise ConfigError(f"{_flag(name)} must be {finite}>= 0, got {value}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be finite and > 0, got {self.lr}")
        for name in ("dropout", "label_smoothing", "momentum", "val_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{_flag(name)} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:
            # jax.random.key(2**32) is the same key as key(0) (32-bit seeds by default)
            raise ConfigError(f"--seed must be in [0, 2**32), got {self.seed}")
        if self.seed + self.num_seeds > 2**32:
            raise ConfigError(
                f"--seed {self.seed} + --num-seeds {self.num_seeds} runs past the last seed 2**32-1"
            )
        check_dataset_name(self.dataset)
        if self.model not in MODELS:
            raise ConfigError(f"unknown --model {self.model!r}; choose one of {sorted(MODELS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"unknown --optimizer {self.optimizer!r}; choose one of {list(OPTIMIZERS)}"
            )
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"unknown --schedule {self.schedule!r}; choose one of {list(SCHEDULES)}"
            )
        if len(self.synthetic_shape) != 3 or min(self.synthetic_shape) <= 0:
            raise ConfigError(f"--synthetic-shape must be H,W,C > 0, got {self.synthetic_shape}")
        if self.synthetic_classes < 2:
            raise ConfigError(f"--synthetic-classes must be >= 2, got {self.synthetic_classes}")
        if self.parallel == "none" and self.devices > 1:
            raise ConfigError(f"--parallel none runs on one device, but --devices {self.devices} "
                              "asks for more (use --parallel auto, mesh or pmap)")
        if self.steps_per_call > 1 and self.num_seeds > 1:
            raise ConfigError("--steps-per-call > 1 runs one seed only; use --num-seeds 1 "
                              "or --steps-per-call 1")
        if not self.workdir.strip():
            raise ConfigError("--workdir must not be empty")
        check_hosts(self.coordinator_address, self.num_processes, self.process_id)
        if self.profile_steps:
            from jaxtrain.profiling import parse_profile_steps

            parse_profile_steps(self.profile_steps)
        if self.wandb_project or self.mlflow_experiment:
            from jaxtrain.writers import check_optional_writers

            check_optional_writers(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------- checks


BUILTIN_DATASETS = ("digits", "synthetic")
# A TFDS name: ``name``, ``name/config``, ``name:version`` (lower case, digits, underscores).
_TFDS_NAME = re.compile(r"[a-z][a-z0-9_]*(/[A-Za-z0-9_.\-]+)?(:[0-9.*]+)?")


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return f"one of {list(args)}"
    if origin is tuple:
        return "a tuple of " + {int: "integers", float: "numbers"}.get(args[0], str(args[0]))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return "None" if tp is type(None) else names.get(tp, getattr(tp, "__name__", str(tp)))


def _has_type(value: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if tp is type(None):
        return value is None
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin is tuple:
        return isinstance(value, tuple) and all(_has_type(v, args[0]) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:  # bool is an int subclass: True is not a batch size
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    return not isinstance(tp, type) or isinstance(value, tp)


def check_types(config: Any) -> None:
    """Raises ``ConfigError`` naming the first field whose value does not match its
    annotation (configs built in Python skip argparse's conversions)."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if not _has_type(value, hints[field.name]):
            raise ConfigError(
                f"{_flag(field.name)} must be {_type_name(hints[field.name])}, got {value!r}"
            )


def check_dataset_name(name: str) -> None:
    """Raises ``ConfigError`` unless ``name`` is built in or spelled like a TFDS name
    (whether TFDS knows it is checked when it is loaded)."""
    if name in BUILTIN_DATASETS or _TFDS_NAME.fullmatch(name):
        return
    from jaxtrain.data import TFDS_DATASETS

    raise ConfigError(
        f"unknown --dataset {name!r}; choose {', '.join(BUILTIN_DATASETS)} or a TFDS name "
        f"such as {', '.join(TFDS_DATASETS)}"
    )


def check_hosts(address: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Raises ``ConfigError`` on a malformed multi-host setting (unset ones are detected later)."""
    if address is not None:
        host, sep, port = address.rpartition(":")
        if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
            raise ConfigError(f"--coordinator-address must be HOST:PORT, got {address!r}")
    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"--num-processes must be >= 1, got {num_processes}")
    if process_id is not None and process_id < 0:
        raise ConfigError(f"--process-id must be >= 0, got {process_id}")
    if num_processes is not None and process_id is not None and process_id >= num_processes:
        raise ConfigError(
            f"--process-id {process_id} must be < --num-processes {num_processes}"
        )


def check_writable_dir(path: str, flag: str) -> None:
    """Raises ``ConfigError`` unless ``path`` is a directory this process can write to,
    or one it can create. Creates nothing (the probe is an unnamed temporary file)."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.lexists(path) and not os.path.isdir(path):
        what = "a broken symbolic link" if not os.path.exists(path) else "a file"
        raise ConfigError(f"{flag} {path} is {what}, not a directory")
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"{flag} {path} cannot be created: {existing} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ConfigError(
            f"{flag} {path} is not writable (cannot create a file in {existing}: "
            f"{e.strerror or type(e).__name__})"
        ) from None


def check_paths(config: TrainConfig, workdir: str | None = None) -> None:
    """Read-only checks of the folders a run writes to or reads from (``workdir``
    defaults to ``config.workdir``); run before anything is written."""
    check_writable_dir(workdir or config.workdir, "--workdir")
    if config.compilation_cache:
        try:
            check_writable_dir(config.compilation_cache, "--compilation-cache")
        except ConfigError as e:
            raise ConfigError(f"{e} (pass --compilation-cache '' to run without it)") from None
    tfds_dir = config.data_dir is not None and config.dataset not in BUILTIN_DATASETS
    if tfds_dir and not os.path.isdir(os.path.expanduser(config.data_dir)):
        raise ConfigError(f"--data-dir {config.data_dir} is not a directory")


def check_model_input(
    model: Any, image_shape: Sequence[int], num_classes: int, name: str
) -> None:
    """Raises ``ConfigError`` unless ``model`` maps images ``[B, *image_shape]`` to
    logits ``[B, num_classes]``. Traced with ``jax.eval_shape``: nothing is compiled."""
    import jax
    import jax.numpy as jnp

    images = jax.ShapeDtypeStruct((2, *image_shape), jnp.float32)
    shape = "x".join(map(str, image_shape))
    if min(image_shape, default=0) <= 0:  # some jax/flax versions trace empty images silently
        raise ConfigError(f"--model {name} cannot take {shape} images of this dataset "
                          "(every image dimension must be positive)")
    try:
        logits, _ = jax.eval_shape(
            lambda x: model.init_with_output(jax.random.PRNGKey(0), x, train=False), images
        )
    except Exception as e:  # noqa: BLE001  (whatever the model raises on this shape)
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(
            f"--model {name} cannot take {shape} images of this dataset "
            f"({type(e).__name__}: {first})"
        ) from None
    if tuple(logits.shape) != (2, num_classes):
        raise ConfigError(
            f"--model {name} gives logits {tuple(logits.shape)} for a batch of 2 {shape} "
            f"images; expected (2, {num_classes})"
        )


# ----------------------------------------------------------------------------- command line


def _parser_type(tp: Any) -> tuple[Any, dict[str, Any]]:
    """argparse ``type`` and extra kwargs for a field annotation."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # X | None
        inner = [a for a in args if a is not type(None)]
        return _parser_type(inner[0])
    if origin is Literal:
        return type(args[0]), {"choices": list(args)}
    if origin is tuple:
        elem = args[0]

        def parse_tuple(s: str) -> tuple:
            return tuple(elem(v) for v in s.replace("x", ",").split(",") if v.strip())

        parse_tuple.__name__ = f"comma-separated {elem.__name__}"  # argparse's error names it
        return parse_tuple, {}
    return tp, {}


# Help for flags whose name alone does not say what they do (others show their name).
FLAG_HELP = {
    "num_seeds": "train this many models (seeds seed..seed+N-1) in one vmapped program",
    "seed_parallel": "shard the seed axis over devices instead of each seed's batch (what "
                     "--cpu-devices auto's CPU devices for a seed run always do)",
    "seed_chunk": "seeds each device computes at a time; 0 = as many as fit in free memory",
    "steps_per_call": "training steps fused into one compiled call (a loop of up to K; "
                      "calls end early on eval and checkpoint steps); 1 = off, 0 = auto: "
                      "fused on CPU devices for the models measured faster so (mlp, cnn, "
                      "resnet_tiny), in calls that end on every log, eval and checkpoint step",
    "data_placement": "where the training split lives: device (batches gathered in the "
                      "step), host (prefetched batches) or auto (device when it fits)",
    "fast_compile": "the robustness suite's programs compiled with LLVM's optimizations off "
                    "(compile ~1.2-2x faster, run ~1.1-2.3x slower): on, off or auto (on "
                    "CPU for test splits of at most 2^18 image values; off for the "
                    "published CIFAR-10-C images)",
    "peer_timeout": "seconds a process of a multi-process run may go unheard (its host "
                    "down or cut off, the process frozen) before the others end, each with "
                    "one line; 0 = left to JAX's heartbeats (100 s, SIGABRT)",
    "cpu_devices": "make this host's CPU N XLA devices before JAX starts, so the step runs "
                   "data-parallel over the cores (--parallel auto); 0 = auto: for a seed "
                   "run, the most devices (<= cores) that divide --num-seeds and the batch "
                   "and keep enough input pixels per device (MLP "
                   "16384 pixels, CNN and ResNets 32768), each holding its seeds (as "
                   "--seed-parallel; 16 digits seeds: 2); else one; 1 = one device",
}


def build_parser(config_type: type[TrainConfig], defaults: TrainConfig, prog: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of ``config_type``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(config_type.__doc__ or "").strip(),
        allow_abbrev=False,  # a prefix such as --batch would change meaning as fields are added
    )
    hints = typing.get_type_hints(config_type)
    for field in dataclasses.fields(config_type):
        default = getattr(defaults, field.name)
        tp = hints[field.name]
        if tp is bool:
            parser.add_argument(
                _flag(field.name), action=argparse.BooleanOptionalAction, default=default,
                help=f"{FLAG_HELP.get(field.name, field.name.replace('_', ' '))} "
                     f"(default: {default})",
            )
            continue
        conv, extra = _parser_type(tp)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        parser.add_argument(
            _flag(field.name), type=conv, default=default, metavar=field.name.upper(),
            help=f"{FLAG_HELP.get(field.name, field.name.replace('_', ' '))} (default: {shown})",
            **extra,
        )
    return parser


def parse_config(
    config_type: type[TrainConfig], defaults: TrainConfig, argv: Sequence[str] | None, prog: str
) -> TrainConfig:
    """Parses ``argv`` over ``defaults``; bad values raise ``ConfigError`` (one line)."""
    parser = build_parser(config_type, defaults, prog)

    def fail(message: str) -> typing.NoReturn:
        raise ConfigError(message)

    parser.error = fail  # type: ignore[method-assign]
    try:
        ns = parser.parse_args(argv)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None
    return config_type(**vars(ns)).validate()
