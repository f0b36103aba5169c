"""16 digits MLPs trained at once in one compiled program, then the robustness
suite on all of them with per-seed spread and 95% intervals: the main job.

    python -m experiments.digits_seeds [--num-seeds 16] [--workdir runs/digits_seeds]
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

from jaxtrain.cli import run
from jaxtrain.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Config(TrainConfig):
    """Digits MLP over many seeds (--batch-size is the global batch of each seed)."""

    robustness: bool = True


DEFAULTS = Config(
    dataset="digits",
    model="mlp",
    epochs=30,
    batch_size=64,
    lr=2e-3,
    optimizer="adam",
    schedule="cosine",
    num_seeds=16,
    workdir="runs/digits_seeds",
)


def main(argv: Sequence[str] | None = None) -> int:
    from jaxtrain.robustness.runner import train_then_robustness

    return run(Config, DEFAULTS, argv, prog="python -m experiments.digits_seeds",
               body=train_then_robustness)


if __name__ == "__main__":
    sys.exit(main())
