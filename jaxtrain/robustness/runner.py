"""Train, then (when ``config.robustness`` is set) run the robustness suite on the result."""

from __future__ import annotations

from typing import Any

from jaxtrain.config import TrainConfig


def train_then_robustness(config: TrainConfig) -> dict[str, Any]:
    """``train_and_evaluate(config)``, then ``run_robustness(config.workdir)`` if asked for.

    Returns the training summary, with the robustness report under ``"robustness"``.
    """
    from jaxtrain.loop import train_and_evaluate

    summary = train_and_evaluate(config)
    if getattr(config, "robustness", False):
        from jaxtrain.robustness.suite import run_robustness

        summary["robustness"] = run_robustness(config.workdir)
    return summary
