"""Typed run configuration and the command line derived from it.

Every field of ``TrainConfig`` (or a subclass) is a flag: ``batch_size`` is
``--batch-size``. ``--help`` lists each with its default. Values are checked by
``validate()`` before anything is compiled or written.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
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
    # loop
    workdir: str = "runs/default"
    eval_every: int = 0
    log_every: int = 50
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: Literal["auto", "never", "must"] = "auto"
    on_nonfinite: Literal["raise", "skip", "rollback"] = "raise"
    max_skipped: int = 10
    progress: Literal["auto", "bar", "log", "none"] = "auto"
    compilation_cache: str = "~/.cache/jaxtrain/xla"
    # devices and hosts
    parallel: Literal["auto", "none", "pmap", "mesh"] = "auto"
    devices: int = 0
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    # Fields that do not change what a run computes; a resumed run may differ in them.
    RUNTIME_FIELDS: typing.ClassVar[frozenset[str]] = frozenset(
        {
            "workdir", "resume", "progress", "log_every", "compilation_cache", "parallel",
            "devices", "coordinator_address", "num_processes", "process_id", "data_dir",
            "checkpoint_every", "keep_checkpoints", "data_placement", "eval_batch_size", "seed_parallel",
        }
    )

    def validate(self) -> TrainConfig:
        """Raises ``ConfigError`` on the first value out of range; returns self."""
        from jaxtrain.models import MODELS
        from jaxtrain.optim import OPTIMIZERS, SCHEDULES

        positive = ("epochs", "batch_size", "num_seeds", "eval_batch_size", "synthetic_size", "log_every",
                    "synthetic_classes", "max_skipped", "keep_checkpoints")
        non_negative = ("eval_every", "checkpoint_every", "warmup_steps", "crop_padding",
                        "devices", "weight_decay", "clip_norm")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{_flag(name)} must be > 0, got {getattr(self, name)}")
        for name in non_negative:
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be finite and > 0, got {self.lr}")
        for name in ("dropout", "label_smoothing", "momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{_flag(name)} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
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
        if self.seed < 0:
            raise ConfigError(f"--seed must be >= 0, got {self.seed}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


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
        return (lambda s: tuple(elem(v) for v in s.replace("x", ",").split(",") if v)), {}
    return tp, {}


def build_parser(config_type: type[TrainConfig], defaults: TrainConfig, prog: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of ``config_type``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(config_type.__doc__ or "").strip(),
    )
    hints = typing.get_type_hints(config_type)
    for field in dataclasses.fields(config_type):
        default = getattr(defaults, field.name)
        tp = hints[field.name]
        if tp is bool:
            parser.add_argument(
                _flag(field.name), action=argparse.BooleanOptionalAction, default=default,
                help=field.name.replace("_", " "),
            )
            continue
        conv, extra = _parser_type(tp)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        parser.add_argument(
            _flag(field.name), type=conv, default=default, metavar=field.name.upper(),
            help=f"{field.name.replace('_', ' ')} (default: {shown})", **extra,
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
