"""jaxtrain: a functional JAX training stack.

Pure data transforms, Flax models, one Optax train step that runs jitted,
pmapped, sharded over a mesh or vmapped over seeds, Orbax checkpoints and a
robustness suite. Heavy optional packages (TFDS, matplotlib) load lazily.
"""

from jaxtrain.compile_options import compiler_options
from jaxtrain.config import ConfigError, TrainConfig
from jaxtrain.cpu_devices import use_cpu_devices
from jaxtrain.data import DataError, Dataset, load_dataset
from jaxtrain.models import MODELS, create_model
from jaxtrain.optim import create_optimizer, create_schedule
from jaxtrain.parallel import ParallelError, Strategy, create_strategy
from jaxtrain.seeds import map_seeds
from jaxtrain.state import TrainState, create_train_state
from jaxtrain.steps import cross_entropy, eval_step, train_step

__version__ = "0.1.0"

__all__ = [
    "MODELS",
    "ConfigError",
    "DataError",
    "Dataset",
    "NonFiniteError",
    "ParallelError",
    "Preempted",
    "Strategy",
    "TrainConfig",
    "TrainState",
    "compiler_options",
    "create_model",
    "create_optimizer",
    "create_schedule",
    "create_strategy",
    "create_train_state",
    "cross_entropy",
    "eval_step",
    "load_dataset",
    "load_params",
    "load_variables",
    "map_seeds",
    "paired_comparison",
    "summarize",
    "summarize_axis",
    "train_and_evaluate",
    "train_step",
    "use_cpu_devices",
]


# The loop and checkpoints pull in Orbax, the writers and scipy: import them on first use.
_LAZY = {
    "train_and_evaluate": "jaxtrain.loop",
    "NonFiniteError": "jaxtrain.nonfinite",
    "Preempted": "jaxtrain.preemption",
    "load_params": "jaxtrain.checkpoint",
    "load_variables": "jaxtrain.checkpoint",
    "summarize": "jaxtrain.stats",
    "summarize_axis": "jaxtrain.stats",
    "paired_comparison": "jaxtrain.stats",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxtrain' has no attribute {name!r}")
