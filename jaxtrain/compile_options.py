"""The XLA compiler options jaxtrain compiles its programs with: CPU convolutions on Eigen.

XLA:CPU (jaxlib 0.10-0.12) hands convolutions to YNNPACK by default. On the
2-core AMD EPYC machines this project develops on, YNNPACK's convolutions were
several times slower than XLA's own (Eigen) ones, gradients worst:

- MNIST-shape conv 14x14x32 -> 64, batch 128: weight gradient 42 -> 11.7 ms,
  forward 14.8 -> 8.9 ms, input gradient 19 -> 10 ms;
- the MNIST-shape CNN training step 1.5-2.2x faster, ResNet-18 on CIFAR-shape
  data (batch 32) 2.85-4.1x (0.25x -> 1.02x PyTorch's images/s), 4 vmapped CNN
  seeds 2.8x (``benchmarks/results/README.md``).

So on CPU every program jaxtrain compiles (the train and eval steps, seeds,
the robustness suite) takes ``CPU_CONV_EIGEN``: XLA's default YNNPACK fusion
types minus ``INDIVIDUAL_CONVOLUTION`` (dots and reductions stay on YNNPACK;
programs without convolutions compile exactly as before, which the tests pin).
A per-program option rather than ``XLA_FLAGS``, so a process that imports
jaxtrain keeps XLA's defaults for its own programs.

Not applied: off CPU; ``jax.pmap`` programs (``pmap`` takes no compiler options);
when ``XLA_FLAGS`` already sets ``--xla_cpu_experimental_ynn_fusion_type`` (the
user's choice wins); when ``JAXTRAIN_XLA_CPU_CONV=xla`` (XLA's own choice, for
comparisons); on jaxlib versions outside ``TESTED_JAXLIB``, whose defaults were
not checked (the option names one version's set, so a future default could
otherwise lose fusions silently).
"""

from __future__ import annotations

import os

import jax

__all__ = ["CPU_CONV_EIGEN", "ENV", "compiler_options"]

ENV = "JAXTRAIN_XLA_CPU_CONV"  # "eigen" (default) or "xla" (XLA's default lowering)
_YNN = "xla_cpu_experimental_ynn_fusion_type"
# XLA's default set was {INDIVIDUAL_DOT, INDIVIDUAL_CONVOLUTION, REDUCE} in jaxlib 0.10.2
# and {DOT, INDIVIDUAL_CONVOLUTION, REDUCE} in 0.12.0 (tests/test_compile_options.py
# checks that adding INDIVIDUAL_CONVOLUTION back gives the default program)
CPU_CONV_EIGEN: dict[str, str] = {_YNN: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_DOT,"
                                        "LIBRARY_FUSION_TYPE_REDUCE"}
TESTED_JAXLIB = ((0, 10), (0, 13))  # [from, to): versions whose defaults were checked


def _jaxlib_version() -> tuple[int, int]:
    import jaxlib.version

    major, minor = jaxlib.version.__version__.split(".")[:2]
    return int(major), int(minor)


def compiler_options(platform: str | None = None) -> dict[str, str] | None:
    """Compiler options for a jaxtrain program on ``platform`` (default: JAX's default
    backend): ``CPU_CONV_EIGEN`` on CPU, else ``None`` (see the module docstring for
    when it is not applied). Pass to ``jax.jit(..., compiler_options=...)`` or
    ``Lowered.compile(...)``."""
    platform = platform or jax.default_backend()
    if platform != "cpu":
        return None
    choice = os.environ.get(ENV, "eigen")
    if choice not in ("eigen", "xla"):
        raise ValueError(f"{ENV}={choice!r}: expected 'eigen' or 'xla'")
    if choice == "xla" or _YNN in os.environ.get("XLA_FLAGS", ""):
        return None
    low, high = TESTED_JAXLIB
    if not low <= _jaxlib_version() < high:
        return None
    return dict(CPU_CONV_EIGEN)
