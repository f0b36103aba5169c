"""Robustness: corruptions, adversarial attacks, calibration and stability metrics, the
batched suite (all corruptions x severities x keys x seeds in a few compiled programs)
and its reports. Heavy optional packages (TFDS, matplotlib) are imported lazily."""

from jaxtrain.robustness.attacks import (
    ATTACK_DEFAULTS,
    AttackSpec,
    attack_loss,
    fgsm,
    pgd_l2,
    pgd_linf,
    robust_accuracy,
    robust_correct,
    run_attack,
)
from jaxtrain.robustness.evaluator import Evaluator, RobustnessError
from jaxtrain.robustness.markdown import render_markdown
from jaxtrain.robustness.metrics import (
    accuracy,
    brier,
    calibration_stats,
    corruption_errors,
    ece,
    finalize_calibration,
    flip_probability,
    mce,
    mean_corruption_error,
    nll,
    relative_ce,
    relative_mce,
)
from jaxtrain.robustness.perturbations import (
    CORRUPTIONS,
    PRESETS,
    SEVERITIES,
    corruption_params,
    param_array,
    perturb,
    perturb_by_param,
    stacked_params,
)
from jaxtrain.robustness.report import build_report, load_baseline, write_report
from jaxtrain.robustness.runner import (
    LoadedRun,
    RobustnessConfig,
    load_run,
    run_robustness,
    train_then_robustness,
)
from jaxtrain.robustness.suite import (
    ATTACK_PRESETS,
    CORRUPTION_GROUPS,
    RANDOM_CORRUPTIONS,
    AttackSetting,
    SuiteResult,
    SuiteSpec,
    attack_settings,
    evaluate_suite,
)
from jaxtrain.robustness.tfds_c import evaluate_cifar10_corrupted, load_cifar10_corrupted

__all__ = [
    "ATTACK_DEFAULTS", "ATTACK_PRESETS", "CORRUPTIONS", "CORRUPTION_GROUPS", "PRESETS",
    "RANDOM_CORRUPTIONS", "SEVERITIES", "AttackSetting", "AttackSpec", "Evaluator", "LoadedRun",
    "RobustnessConfig", "RobustnessError", "SuiteResult", "SuiteSpec", "accuracy", "attack_loss",
    "attack_settings", "brier", "build_report", "calibration_stats", "corruption_errors",
    "corruption_params", "ece", "evaluate_cifar10_corrupted", "evaluate_suite", "fgsm",
    "finalize_calibration", "flip_probability", "load_baseline", "load_cifar10_corrupted",
    "load_run", "mce", "mean_corruption_error", "nll", "param_array", "perturb",
    "perturb_by_param", "pgd_l2", "pgd_linf", "relative_ce", "relative_mce", "render_markdown",
    "robust_accuracy", "robust_correct", "run_attack", "run_robustness", "stacked_params",
    "train_then_robustness", "write_report",
]
