"""MLP on scikit-learn's embedded 8x8 digits: the main job (no network needed).

    python -m experiments.digits_mlp [--epochs 30] [--workdir runs/digits_mlp]
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

from jaxtrain.cli import run
from jaxtrain.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Config(TrainConfig):
    """Digits MLP (--batch-size is the global batch)."""

    robustness: bool = False  # evaluate the robustness suite at the end of training


DEFAULTS = Config(
    dataset="digits",
    model="mlp",
    epochs=30,
    batch_size=64,
    lr=2e-3,
    optimizer="adam",
    schedule="cosine",
    workdir="runs/digits_mlp",
)


def main(argv: Sequence[str] | None = None) -> int:
    from jaxtrain.robustness.runner import train_then_robustness

    return run(Config, DEFAULTS, argv, prog="python -m experiments.digits_mlp",
               body=train_then_robustness)


if __name__ == "__main__":
    sys.exit(main())
