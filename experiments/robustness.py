"""The robustness suite on a trained run: corruptions x severities, attacks, calibration,
stability; all seeds of a seed run in one program. Writes WORKDIR/robustness/.

    python -m experiments.robustness --workdir runs/digits_seeds [--baseline OTHER/robustness/report.json]
        [--corruptions gaussian_noise,contrast] [--severities 1,3,5] [--num-keys 2]
        [--attacks fgsm,pgd_linf] [--eps 0.05,0.1] [--preset cifar|imagenet] [--cifar10-corrupted]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jaxtrain.cli import run
from jaxtrain.robustness.runner import RobustnessConfig, run_robustness

DEFAULTS = RobustnessConfig()


def main(argv: Sequence[str] | None = None) -> int:
    return run(RobustnessConfig, DEFAULTS, argv, prog="python -m experiments.robustness",
               body=lambda config: run_robustness(config.workdir, config))


if __name__ == "__main__":
    sys.exit(main())
