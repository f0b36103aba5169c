"""ResNet-18 (CIFAR variant) on CIFAR-10 (TFDS): expected ~94-95% test accuracy.

    python -m experiments.cifar10_resnet [--data-dir DIR] [--epochs 50] [--dtype bfloat16]

Needs CIFAR-10 prepared for ``tfds.data_source`` (array_record): on a machine
with network, ``tfds build cifar10 --file_format=array_record --data_dir DIR``,
then pass ``--data-dir DIR``. Recipe: SGD with momentum 0.9 (no Nesterov), lr
0.1 for batch 128 (scale it linearly with ``--batch-size``), weight decay 5e-4,
one warmup epoch then cosine decay over 50 epochs, random crop (padding 4) and
horizontal flip, label smoothing 0.1. The expected accuracy is the usual figure
for this recipe at 50 epochs (about 93% at 30), not measured here. On CPU use
``--model resnet_tiny`` and few ``--epochs`` to try it out.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

from jaxtrain.cli import run
from jaxtrain.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Config(TrainConfig):
    """CIFAR-10 ResNet-18 (--batch-size is the global batch; scale --lr with it)."""


DEFAULTS = Config(
    dataset="cifar10",
    model="resnet18",
    epochs=50,
    batch_size=128,
    eval_batch_size=1000,
    optimizer="momentum",
    momentum=0.9,
    lr=0.1,
    weight_decay=5e-4,
    schedule="cosine",
    warmup_steps=351,  # one epoch of the 45,000 training examples at batch 128
    label_smoothing=0.1,
    crop_padding=4,
    flip=True,
    workdir="runs/cifar10_resnet",
)


def main(argv: Sequence[str] | None = None) -> int:
    return run(Config, DEFAULTS, argv, prog="python -m experiments.cifar10_resnet")


if __name__ == "__main__":
    sys.exit(main())
